"""The one place a Consul client is made, on both sides: the control plane's components and a packaged model's
own process (which has `contract` and `runtime_sdk`, not the control plane).

Address, ACL token, and the CA of an https agent (flag > CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_CACERT, as
the consul CLI reads them: controlplane/config.py), so a new setting reaches every client at once.
"""

from __future__ import annotations

import consul.aio


def connect(
    scheme: str, host: str, port: int, token: str | None = None, ca_file: str | None = None
) -> consul.aio.Consul:
    """An asyncio Consul client; https verifies the agent against `ca_file` if given, else the system's CAs."""
    verify: bool | str = ca_file or True
    return consul.aio.Consul(host=host, port=port, scheme=scheme, token=token, verify=verify)
