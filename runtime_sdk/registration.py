"""A runtime's own entry in Consul: registered on start, kept while it runs, removed on stop."""

from __future__ import annotations

import uuid
from typing import Any

import consul
import consul.aio

from contract.service import RuntimeService
from contract.watch import keep_registered

PROCESS = uuid.uuid4().hex[:12]  # this process: in its check's notes, so a restart under the same ID is seen


async def register(
    client: consul.aio.Consul, service: RuntimeService, through_sidecar: bool = True, passing: bool = False
) -> None:
    """Register with a check Consul runs every second.

    The check goes through the sidecar, so an instance only turns passing once
    its Envoy has config and its model is loaded: through its ingress, or, when
    that requires a client certificate (mTLS), through its loopback egress
    (Consul's agent runs on the same host).
    """
    if not through_sidecar:
        url = f"http://127.0.0.1:{service.health_port or service.runtime_port}/readyz"  # loopback-bound
    elif service.tls_dir:
        url = f"http://127.0.0.1:{service.egress_port}/readyz"
    else:
        url = f"http://{service.host}:{service.ingress_port}/readyz"
    check: dict[str, Any] = consul.Check.http(url, interval="1s", timeout="1s", deregister="1m")
    check["Notes"] = f"process {PROCESS}"  # a restart under the same ID is a change discovery sees
    if passing:  # re-registering a runtime known to be healthy: no critical gap
        check["Status"] = "passing"
    await client.agent.service.register(
        service.model,
        service_id=service.service_id,
        address=service.host,
        port=service.ingress_port,
        tags=service.tags(),
        meta=service.to_meta(),
        check=check,
    )


async def deregister(client: consul.aio.Consul, service_id: str) -> None:
    await client.agent.service.deregister(service_id)


async def stay_registered(client: consul.aio.Consul, service: RuntimeService, through_sidecar: bool) -> None:
    """Anti-entropy for this runtime's entry (see contract.watch.keep_registered)."""

    async def known() -> bool:
        return service.service_id in await client.agent.services()

    async def again() -> None:
        await register(client, service, through_sidecar, passing=True)

    await keep_registered(known, again, f"service_id={service.service_id}")
