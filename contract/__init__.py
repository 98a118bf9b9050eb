"""What the runtime SDK and the control plane agree on, in one place both import.

This package imports neither `controlplane` nor `runtime_sdk` (a test walks the
imports and fails otherwise). It holds the formats that cross the boundary —
header names, the Consul service meta, cluster/path/topic names, the Kafka
routing table, the payload rule — and the two loops both sides run against
Consul and Kafka, written once.
"""
