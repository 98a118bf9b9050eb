"""Runtimes from Consul: blocking queries, never tight polling.

One watch on the service catalog finds ML Lambda services (tag `mllambda`);
one watch per service follows its instances and their health. Following
Consul's guidance for blocking queries: an index that goes backwards resets
to 0, errors back off with jitter, and on an outage the last known instances
are kept (an empty set is never pushed because Consul is unreachable).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import consul.aio

from controlplane.model import model_cluster

log = logging.getLogger("mllambda.discovery")
TAG = "mllambda"
BRIDGE_SERVICE = "mllambda-bridge"  # control planes serving the Kafka HTTP bridge


@dataclass(frozen=True)
class Instance:
    """One registered runtime with its sidecar's addresses (from Consul service meta)."""

    service_id: str
    model: str
    version: str
    host: str
    passing: bool
    runtime_port: int
    runtime_uds: str
    ingress_port: int
    egress_port: int
    egress_uds: str
    envoy_admin_port: int = 0
    kafka_port: int = 0  # the sidecar's Kafka listener (0: none)

    @property
    def cluster(self) -> str:
        return model_cluster(self.model, self.version)

    @classmethod
    def from_health_entry(cls, entry: Mapping[str, Any]) -> Instance | None:
        service, meta = entry["Service"], entry["Service"].get("Meta") or {}
        try:
            return cls(
                service_id=service["ID"],
                model=meta["model"],
                version=meta["version"],
                host=service.get("Address") or entry["Node"]["Address"],
                passing=all(c["Status"] == "passing" for c in entry.get("Checks", [])),
                runtime_port=int(meta["runtime_port"]),
                runtime_uds=meta.get("runtime_uds", ""),
                ingress_port=int(meta["ingress_port"]),
                egress_port=int(meta["egress_port"]),
                egress_uds=meta.get("egress_uds", ""),
                envoy_admin_port=int(meta.get("envoy_admin_port") or 0),
                kafka_port=int(meta.get("kafka_port") or 0),
            )
        except (KeyError, ValueError) as err:
            log.warning("ignoring service %s with incomplete meta: %s", service.get("ID"), err)
            return None


class Backoff:
    def __init__(self, first: float = 0.2, cap: float = 10.0) -> None:
        self.first, self.cap, self.failures = first, cap, 0

    def next_delay(self) -> float:
        self.failures += 1
        return random.uniform(0, min(self.cap, self.first * 2**self.failures))

    def reset(self) -> None:
        self.failures = 0


def next_index(previous: int, returned: Any) -> int:
    """Consul: if the index goes backwards, start over from 0."""
    index = int(returned or 0)
    return 0 if index < previous else index


class Discovery:
    def __init__(self, client: consul.aio.Consul, on_change: Callable[[], None], wait: str = "30s") -> None:
        self.client = client
        self.on_change = on_change
        self.wait = wait
        self.by_service: dict[str, dict[str, Instance]] = {}
        self.bridges: tuple[tuple[str, int], ...] = ()  # passing bridges of this deployment, sorted
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self.errors = 0
        self.last_success = 0.0
        self.reachable = False

    def instances(self) -> list[Instance]:
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
        index, backoff, wait = 0, Backoff(), self.wait
        try:
            while True:
                try:
                    returned, services = await self.client.catalog.services(index=index or None, wait=wait)
                except asyncio.CancelledError:
                    raise
                except Exception as err:
                    self._failed("catalog", err)
                    await asyncio.sleep(backoff.next_delay())
                    continue
                backoff.reset()
                self._ok()
                index = next_index(index, returned)
                self._sync_watchers({name for name, tags in services.items() if TAG in (tags or [])})
        finally:
            for task in self._watchers.values():
                task.cancel()

    def _sync_watchers(self, names: set[str]) -> None:
        for name in names - set(self._watchers):
            self._watchers[name] = asyncio.create_task(self._watch_service(name))
        for name in set(self._watchers) - names:
            self._watchers.pop(name).cancel()
            if self.by_service.pop(name, None):
                self.on_change()

    async def _watch_service(self, name: str) -> None:
        await self._follow(name, lambda entries: self._take_instances(name, entries))

    async def watch_bridges(self, kv_prefix: str) -> None:
        """Passing Kafka bridges of the control planes that share this KV prefix."""
        await self._follow(BRIDGE_SERVICE, lambda entries: self._take_bridges(kv_prefix, entries), passing=True)

    async def _follow(self, name: str, take: Callable[[list[dict[str, Any]]], None], passing: bool = False) -> None:
        """A blocking query on one service's health, forever; `take` gets each answer."""
        index, backoff, wait = 0, Backoff(), self.wait
        while True:
            try:
                returned, entries = await self.client.health.service(
                    name, index=index or None, wait=wait, passing=passing
                )
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self._failed(f"service {name}", err)
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self._ok()
            index = next_index(index, returned)
            take(entries)

    def _take_instances(self, name: str, entries: list[dict[str, Any]]) -> None:
        found = {i.service_id: i for e in entries if (i := Instance.from_health_entry(e))}
        if found != self.by_service.get(name):
            self.by_service[name] = found
            log.info("service=%s instances=%d passing=%d", name, len(found), sum(i.passing for i in found.values()))
            self.on_change()

    def _take_bridges(self, kv_prefix: str, entries: list[dict[str, Any]]) -> None:
        found = tuple(
            sorted(
                (e["Service"].get("Address") or e["Node"]["Address"], int(e["Service"]["Port"]))
                for e in entries
                if (e["Service"].get("Meta") or {}).get("kv_prefix") == kv_prefix
            )
        )
        if found != self.bridges:
            self.bridges = found
            log.info("kafka bridges=%s", ", ".join(f"{host}:{port}" for host, port in found) or "none")
            self.on_change()
