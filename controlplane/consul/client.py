"""The control plane's Consul clients: every component that talks to Consul takes a `ConsulAddress` (flag >
CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_CACERT, as the consul CLI reads them) and gets its client here,
made by contract/consul_client.py (the one place, shared with a packaged model's own process).
"""

from __future__ import annotations

import consul.aio

from contract import consul_client
from controlplane.config import ConsulAddress


def connect(address: ConsulAddress) -> consul.aio.Consul:
    """An asyncio Consul client; https verifies the agent against `ca_file` if given, else the system's CAs."""
    return consul_client.connect(address.scheme, address.host, address.port, address.token, address.ca_file)
