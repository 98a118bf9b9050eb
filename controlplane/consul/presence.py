"""A service entry of the control plane's own in Consul (its Kafka bridge, its metrics endpoint):
registered while it runs, registered again if the agent forgets it, removed on stop."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import consul.aio

from contract.watch import keep_registered

log = logging.getLogger("mllambda.consul")


@dataclass
class Presence:
    client: consul.aio.Consul
    name: str
    service_id: str
    host: str
    port: int
    check: dict[str, Any]
    meta: dict[str, str] = field(default_factory=dict)
    _keeper: asyncio.Task[None] | None = None

    async def start(self) -> Presence:
        try:
            await self._register()
        except Exception as err:  # Consul away: the keeper registers it when it is back
            log.warning("registering %s failed: %s", self.service_id, err)
        self._keeper = asyncio.create_task(keep_registered(self._known, self._register, self.service_id))
        return self

    async def _register(self) -> None:
        await self.client.agent.service.register(
            self.name,
            service_id=self.service_id,
            address=self.host,
            port=self.port,
            tags=[self.name],
            meta=self.meta,
            check=self.check,
        )

    async def _known(self) -> bool:
        return self.service_id in await self.client.agent.services()

    async def stop(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
        try:
            await self.client.agent.service.deregister(self.service_id)
        except Exception as err:
            log.warning("deregistering %s failed: %s", self.service_id, err)
