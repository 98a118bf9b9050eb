"""A runtime's entry in Consul: what it serves and where its sidecar listens."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import consul
import consul.aio

TAG = "mllambda"
log = logging.getLogger("mllambda.runtime")


@dataclass(frozen=True)
class Registration:
    service_id: str
    model: str
    version: str
    host: str
    runtime_port: int
    runtime_uds: str
    ingress_port: int  # the sidecar listener other Envoys send to
    egress_port: int  # the sidecar listener this runtime forwards to
    egress_uds: str
    envoy_admin_port: int
    kafka_port: int = 0  # the sidecar listener that proxies to the Kafka broker

    def meta(self) -> dict[str, str]:
        return {
            "model": self.model,
            "version": self.version,
            "runtime_port": str(self.runtime_port),
            "runtime_uds": self.runtime_uds,
            "ingress_port": str(self.ingress_port),
            "egress_port": str(self.egress_port),
            "egress_uds": self.egress_uds,
            "envoy_admin_port": str(self.envoy_admin_port),
            "kafka_port": str(self.kafka_port),
        }


async def register(
    client: consul.aio.Consul, reg: Registration, through_sidecar: bool = True, passing: bool = False
) -> None:
    """Register with a check Consul runs every second.

    The check goes through the sidecar's ingress listener, so an instance only
    turns passing once its Envoy has config and its model is loaded.
    """
    port = reg.ingress_port if through_sidecar else reg.runtime_port
    check: dict[str, Any] = consul.Check.http(
        f"http://{reg.host}:{port}/readyz", interval="1s", timeout="1s", deregister="1m"
    )
    if passing:  # re-registering a runtime known to be healthy: no critical gap
        check["Status"] = "passing"
    await client.agent.service.register(
        reg.model,
        service_id=reg.service_id,
        address=reg.host,
        port=reg.ingress_port,
        tags=[TAG, f"version-{reg.version}"],
        meta=reg.meta(),
        check=check,
    )


async def deregister(client: consul.aio.Consul, service_id: str) -> None:
    await client.agent.service.deregister(service_id)


async def keep_registered(
    client: consul.aio.Consul, service_id: str, register_again: Callable[[], Awaitable[None]]
) -> None:
    """Anti-entropy: if the agent forgot a service (restarted, wiped), register it again."""
    while True:
        await asyncio.sleep(2)
        try:
            services = await client.agent.services()
            if service_id not in services:
                await register_again()
                log.info("re-registered service_id=%s", service_id)
        except Exception as err:  # Consul away: try again next round
            log.debug("registration check failed: %s", err)
