"""The one place a Consul client is made: address, ACL token, and the CA of an https agent.

Every component that talks to Consul takes a `ConsulAddress` (flag > CONSUL_HTTP_ADDR,
CONSUL_HTTP_TOKEN, CONSUL_CACERT, as the consul CLI reads them) and gets its client here,
so a new setting (a CA, a token) reaches all of them at once.
"""

from __future__ import annotations

import consul.aio

from controlplane.config import ConsulAddress


def connect(address: ConsulAddress) -> consul.aio.Consul:
    """An asyncio Consul client; https verifies the agent against `ca_file` if given, else the system's CAs."""
    verify: bool | str = address.ca_file or True
    return consul.aio.Consul(
        host=address.host, port=address.port, scheme=address.scheme, token=address.token, verify=verify
    )
