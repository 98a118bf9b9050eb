"""Runtimes from Consul: blocking queries, never tight polling (see contract.watch).

One watch on the service catalog finds ML Lambda services (tag `mllambda`);
one watch per service follows its instances and their health. On an outage the
last known instances are kept (an empty set is never pushed because Consul is
unreachable). A registration whose meta does not fit the schema is left out
and logged once; it never stops the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import consul.aio

from contract.naming import BRIDGE_SERVICE, SERVICE_TAG
from contract.service import BadRegistration, RuntimeService, bridge_address
from contract.watch import WAIT, watch

log = logging.getLogger("mllambda.discovery")


class Discovery:
    def __init__(
        self,
        client: consul.aio.Consul,
        on_change: Callable[[], None],
        wait: str = WAIT,
        reserved_ids: frozenset[str] = frozenset(),
    ) -> None:
        self.client = client
        self.reserved_ids = reserved_ids  # node ids of the control plane's own Envoys (the gateway)
        self.on_change = on_change
        self.wait = wait
        self.by_service: dict[str, dict[str, RuntimeService]] = {}
        self.bridges: tuple[tuple[str, int], ...] = ()  # passing bridges of this deployment, sorted
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._refused: dict[str, str] = {}  # service id -> why its registration is ignored (logged once)
        self.errors = 0
        self.last_success = 0.0
        self.reachable = False

    def instances(self) -> list[RuntimeService]:
        return sorted((i for group in self.by_service.values() for i in group.values()), key=lambda i: i.service_id)

    def known_models(self) -> set[tuple[str, str]]:
        return {(i.model, i.version) for i in self.instances()}

    def staleness(self) -> float:
        return time.time() - self.last_success if self.last_success else float("inf")

    def _ok(self) -> None:
        self.reachable, self.last_success = True, time.time()

    def _failed(self, what: str, err: Exception) -> None:
        self.errors += 1
        if self.reachable:
            log.warning("consul unreachable (%s): %s; keeping last known endpoints", what, err)
        self.reachable = False

    async def run(self) -> None:
        async def services(index: int | None) -> tuple[Any, dict[str, list[str]]]:
            return await self.client.catalog.services(index=index, wait=self.wait)

        def take(found: dict[str, list[str]]) -> None:
            self._sync_watchers({name for name, tags in found.items() if SERVICE_TAG in (tags or [])})

        try:
            await watch(services, take, what="catalog", on_error=self._failed, on_success=self._ok)
        finally:
            for task in self._watchers.values():
                task.cancel()

    def _sync_watchers(self, names: set[str]) -> None:
        for name in names - set(self._watchers):
            self._watchers[name] = asyncio.create_task(self._follow(name, self._instances_of(name)))
        for name in set(self._watchers) - names:
            self._watchers.pop(name).cancel()
            if self.by_service.pop(name, None):
                self.on_change()

    async def watch_bridges(self, kv_prefix: str) -> None:
        """Passing Kafka bridges of the control planes that share this KV prefix."""

        def take(entries: list[dict[str, Any]]) -> None:
            found = tuple(sorted({a for e in entries if (a := bridge_address(e, kv_prefix))}))
            if found != self.bridges:
                self.bridges = found
                log.info("kafka bridges=%s", ", ".join(f"{host}:{port}" for host, port in found) or "none")
                self.on_change()

        await self._follow(BRIDGE_SERVICE, take, passing=True)

    async def _follow(self, name: str, take: Callable[[list[dict[str, Any]]], None], passing: bool = False) -> None:
        """A blocking query on one service's health, forever; `take` gets each answer."""

        async def health(index: int | None) -> tuple[Any, list[dict[str, Any]]]:
            return await self.client.health.service(name, index=index, wait=self.wait, passing=passing)

        await watch(health, take, what=f"service {name}", on_error=self._failed, on_success=self._ok)

    def _instances_of(self, name: str) -> Callable[[list[dict[str, Any]]], None]:
        def take(entries: list[dict[str, Any]]) -> None:
            found = {}
            for entry in entries:
                try:
                    instance = RuntimeService.from_entry(entry)
                    if instance.service_id in self.reserved_ids:
                        raise BadRegistration(
                            f"service id {instance.service_id!r} is reserved (an Envoy of ours uses it)"
                        )
                except BadRegistration as err:
                    self._refuse(entry, str(err))
                    continue
                found[instance.service_id] = instance
            if found != self.by_service.get(name):
                self.by_service[name] = found
                passing = sum(i.passing for i in found.values())
                log.info("service=%s instances=%d passing=%d", name, len(found), passing)
                self.on_change()

        return take

    def _refuse(self, entry: dict[str, Any], why: str) -> None:
        service_id = str((entry.get("Service") or {}).get("ID", "?"))
        if self._refused.get(service_id) != why and len(self._refused) < 10_000:
            self._refused[service_id] = why
            log.warning("ignoring service %s: %s", service_id[:200], why)
