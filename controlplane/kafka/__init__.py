"""Kafka pipelines on the control plane side: routing tables and entry routers (plane), the HTTP bridge (bridge)."""
