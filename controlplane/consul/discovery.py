"""Runtimes from Consul with a fixed number of blocking queries, whatever the fleet size.

Two blocking queries follow the whole fleet (see contract.watch): the service
catalog (which services carry the `mllambda` tag) and the health checks of
tagged services (`/v1/health/state/any`, filtered). A service whose checks
changed (an instance registered, deregistered, or its health moved) is read
again with one non-blocking query, at most READS at a time; so is a service
without any check, on every catalog change. A full re-read every RESYNC
seconds catches what neither shows (meta changed in place under the same
checks). So 2,000 services cost two held connections, not 2,000.

Failure behaviour:
- Consul unreachable: the last known instances stay in force.
- A registration whose meta does not fit the schema, or that takes a reserved
  node id (the gateway's), is left out and logged once; it stops no other.
- Until the first complete read (catalog, checks, every tagged service)
  `complete` is False and the control plane pushes nothing.
- Every passing instance gone at once (an agent restarted, a token that lost
  read rights) is suspect: the last passing set is held for `empty_grace`
  seconds and reported (`holding`), then let through if it lasts. Instances
  that register meanwhile are added to it (a replacement gets its sidecar's
  config, passes, and ends the hold). The hold is per model version: after an
  agent restart runtimes register again one by one, so a version keeps its held
  instances until one of its own passes again (found by bench.soak: ending the
  hold at the first runtime back emptied the others' clusters for seconds).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import consul.aio

from contract.naming import BRIDGE_SERVICE, SERVICE_TAG
from contract.service import BadRegistration, RuntimeService, bridge_address
from contract.watch import WAIT, Backoff, watch

log = logging.getLogger("mllambda.discovery")
READS = 8  # service reads in flight at once
SPACING = 0.1  # most seconds between two answers of the fleet-wide checks query (20 us per check in it)
RESYNC = 30.0  # seconds between full re-reads
EMPTY_GRACE = 30.0  # seconds the last passing instances are held when all vanish at once
MAX_REFUSED = 1_000  # refused registrations remembered (to log each once) and shown
Fingerprint = frozenset[tuple[str, str, str, str]]  # (service id, check id, status, notes) of its checks


@dataclass(frozen=True)
class ConsulHealth:
    reachable: bool
    errors: int  # failed queries since start
    staleness: float  # seconds since the last good answer (inf: never)
    holding_since: float | None = None  # every passing runtime vanished at once; the last set is held
    held_drops: int = 0  # how often that happened
    refused: Mapping[str, str] = field(default_factory=dict)  # service id -> why its registration is ignored


def fingerprints(checks: list[dict[str, Any]]) -> dict[str, Fingerprint]:
    """Per service name, what its health checks say; a change means: read it again.

    A check's notes are part of it: a runtime names its process in them (registration.py), so an
    instance registered again under its ID (a restarted replica, on new ports) is read again. Its
    check keeps the state the old one ended in (critical), and Consul's agent syncs a check's new
    output only every few minutes: without the notes, its sidecar would get the old ports' config,
    its check could not pass, and only RESYNC would find it (~25 s of 503s; test_supervision.py)."""
    found: dict[str, set[tuple[str, str, str, str]]] = {}
    for check in checks:
        name = check.get("ServiceName")
        if name:
            found.setdefault(str(name), set()).add(
                (
                    str(check.get("ServiceID")),
                    str(check.get("CheckID")),
                    str(check.get("Status")),
                    str(check.get("Notes")),
                )
            )
    return {name: frozenset(marks) for name, marks in found.items()}


class Discovery:
    def __init__(
        self,
        client: consul.aio.Consul,
        on_change: Callable[[], None],
        wait: str = WAIT,
        reserved_ids: frozenset[str] = frozenset(),
        empty_grace: float = EMPTY_GRACE,
        require_tls: bool = False,
    ) -> None:
        self.client = client
        self.require_tls = require_tls  # mTLS deployment: a runtime without a certificate folder is refused
        self.reserved_ids = reserved_ids  # node ids of the control plane's own Envoys (the gateway)
        self.on_change = on_change
        self.wait = wait
        self.empty_grace = empty_grace
        self.by_service: dict[str, dict[str, RuntimeService]] = {}
        self.edges: dict[str, tuple[tuple[str, int], ...]] = {}  # service -> its passing instances here, sorted
        self._refused: dict[str, dict[str, str]] = {}  # service name -> service id -> why it is ignored
        self.errors = 0
        self.last_success = 0.0
        self.reachable = False
        self.holding_since: float | None = None  # every passing instance vanished; the last set is held
        self._held: list[RuntimeService] = []  # that set: each kept until its model version passes again
        self.held_drops = 0  # how many times that happened
        self._names: set[str] | None = None  # tagged services, once the catalog answered
        self._checks: dict[str, Fingerprint] | None = None
        self._read_at: dict[str, Fingerprint] = {}  # fingerprint each service was last read for
        self._stale: set[str] = set()
        self._wake = asyncio.Event()
        self._complete = False
        self._published: list[RuntimeService] = []
        self._release: asyncio.TimerHandle | None = None

    # What the control plane reads.

    @property
    def complete(self) -> bool:
        """Has every part of the fleet been read at least once? (Nothing is pushed before.)"""
        if not self._complete and self._names is not None and self._checks is not None:
            self._complete = self._names <= set(self.by_service)
        return self._complete

    def instances(self) -> list[RuntimeService]:
        return self._published

    def instance(self, service_id: str) -> RuntimeService | None:
        """A registered runtime by its service id (its Envoy's node id), as last read from Consul."""
        for group in self.by_service.values():
            if service_id in group:
                return group[service_id]
        return None

    @property
    def refused(self) -> dict[str, str]:
        """Registrations ignored now (service id -> why), at most MAX_REFUSED."""
        found = {sid: why for group in self._refused.values() for sid, why in group.items()}
        return dict(sorted(found.items())[:MAX_REFUSED])

    def known_models(self) -> set[tuple[str, str]]:
        return {(i.model, i.version) for i in self.instances()}

    def staleness(self) -> float:
        return time.time() - self.last_success if self.last_success else float("inf")

    def health(self) -> ConsulHealth:
        refused = dict(self.refused)
        return ConsulHealth(self.reachable, self.errors, self.staleness(), self.holding_since, self.held_drops, refused)

    # Reading Consul.

    def _ok(self) -> None:
        self.reachable, self.last_success = True, time.time()

    def _failed(self, what: str, err: Exception) -> None:
        self.errors += 1
        if self.reachable:
            log.warning("consul unreachable (%s): %s; keeping last known endpoints", what, err)
        self.reachable = False

    async def run(self) -> None:
        async def services(index: int | None) -> tuple[Any, dict[str, list[str]]]:
            # a first read is consistent: a server just restarted may not have replayed its log yet (store.view)
            consistency = "consistent" if index is None else None
            return await self.client.catalog.services(index=index, wait=self.wait, consistency=consistency)

        async def checks(index: int | None) -> tuple[Any, list[dict[str, Any]]]:
            return await self.client.health.state(
                "any", index=index, wait=self.wait, filter_expr=f'"{SERVICE_TAG}" in ServiceTags'
            )

        common: dict[str, Any] = {"on_error": self._failed, "on_success": self._ok}
        tasks = [
            asyncio.create_task(watch(services, self._take_catalog, what="catalog", **common)),
            asyncio.create_task(
                watch(checks, self._take_checks, what="health checks", spacing=self._spacing, **common)
            ),
            asyncio.create_task(self._read_forever()),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            if self._release is not None:
                self._release.cancel()

    def _take_catalog(self, found: dict[str, list[str]]) -> None:
        names = {name for name, tags in found.items() if SERVICE_TAG in (tags or [])}
        gone = set(self.by_service) - names
        for name in gone:
            del self.by_service[name]
            self._read_at.pop(name, None)
            self._refused.pop(name, None)
        self._names = names
        # Checks show most changes; a service without any (not an ML Lambda runtime's way, but possible)
        # is read again on every catalog change instead.
        blind = {n for n in names if not (self._checks or {}).get(n)}
        self._mark_stale((names - set(self.by_service)) | blind)
        if gone:
            self._publish()

    def _spacing(self) -> float:
        """The checks query's answer grows with the fleet: read it at most every 20 us per check, up to SPACING."""
        return min(SPACING, 0.00002 * sum(len(marks) for marks in (self._checks or {}).values()))

    def _take_checks(self, found: list[dict[str, Any]]) -> None:
        self._checks = fingerprints(found)
        names = self._names if self._names is not None else set(self._checks)
        self._mark_stale({n for n in names if self._read_at.get(n) != self._checks.get(n, frozenset())})

    def _mark_stale(self, names: set[str]) -> None:
        if names:
            self._stale |= names
            self._wake.set()

    async def _read_forever(self) -> None:
        """Read stale services, READS at a time; everything again every RESYNC seconds."""
        backoff, resync_at = Backoff(), time.monotonic() + RESYNC
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, resync_at - time.monotonic()))
            except TimeoutError:
                self._stale |= self._names or set()
                resync_at = time.monotonic() + RESYNC
            self._wake.clear()
            batch, self._stale = sorted(self._stale), set()
            limit = asyncio.Semaphore(READS)
            results = await asyncio.gather(*(self._read(name, limit) for name in batch))
            failed = {name for name, ok in zip(batch, results, strict=True) if not ok}
            self._publish()
            if failed:
                self._stale |= failed
                self._wake.set()
                await asyncio.sleep(backoff.next_delay())
            else:
                backoff.reset()

    async def _read(self, name: str, limit: asyncio.Semaphore) -> bool:
        mark = (self._checks or {}).get(name, frozenset())
        async with limit:
            try:
                _, entries = await self.client.health.service(name)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                self._failed(f"service {name}", err)
                return False
        self._ok()
        if self._names is not None and name not in self._names:
            return True  # left the catalog while we read it
        self.by_service[name] = self._parse(name, entries or [])
        self._read_at[name] = mark
        return True

    def _parse(self, name: str, entries: list[dict[str, Any]]) -> dict[str, RuntimeService]:
        found, before, self._refused[name] = {}, self._refused.get(name, {}), {}
        for entry in entries:
            try:
                instance = RuntimeService.from_entry(entry)
                if instance.service_id in self.reserved_ids:
                    raise BadRegistration(f"service id {instance.service_id!r} is reserved (an Envoy of ours uses it)")
                if self.require_tls and not instance.tls_dir:
                    raise BadRegistration("no certificate folder (meta 'tls_dir'): start it with --security mtls")
            except (BadRegistration, AttributeError, TypeError) as err:  # not even an entry: same
                self._refuse(name, entry if isinstance(entry, dict) else {}, str(err), before)
                continue
            found[instance.service_id] = instance
        return found

    def _refuse(self, name: str, entry: dict[str, Any], why: str, before: dict[str, str]) -> None:
        service_id, why = str((entry.get("Service") or {}).get("ID", "?"))[:200], why[:200]
        if len(self._refused[name]) < MAX_REFUSED:
            self._refused[name][service_id] = why
        if before.get(service_id) != why:
            log.warning("ignoring service %r: %s", service_id, why)  # once per registration and reason

    # What is published, with the hold on a sudden drop to nothing.

    def _fresh(self) -> list[RuntimeService]:
        return sorted((i for group in self.by_service.values() for i in group.values()), key=lambda i: i.service_id)

    def _publish(self) -> None:
        fresh = self._fresh()
        had_passing = any(i.passing for i in self._published)
        if self.holding_since is None and had_passing and not any(i.passing for i in fresh) and self.empty_grace > 0:
            self.holding_since, self.held_drops = time.time(), self.held_drops + 1
            self._held = [i for i in self._published if i.passing]
            log.warning(
                "every passing runtime vanished at once (%d were passing); holding them for %.0f s",
                len(self._held),
                self.empty_grace,
            )
            self._release = asyncio.get_running_loop().call_later(self.empty_grace, self._let_go)
        if self.holding_since is not None:
            # Held per model version until that version has a passing instance again: after a Consul agent
            # restart runtimes register again one by one, and the first back must not end the hold for all.
            # Newcomers join at once: a replacement's sidecar needs its config before its check (which goes
            # through that sidecar) can pass.
            back = {i.cluster for i in fresh if i.passing}
            waiting = [i for i in self._held if i.cluster not in back]
            if not waiting:
                self._stop_holding()
            else:
                kept = {i.service_id for i in waiting}
                fresh = sorted([*(i for i in fresh if i.service_id not in kept), *waiting], key=lambda i: i.service_id)
        if fresh == self._published:
            return
        self._published = fresh
        log.info(
            "runtimes services=%d instances=%d passing=%d%s",
            len(self.by_service),
            len(fresh),
            sum(i.passing for i in fresh),
            " (some held)" if self.holding_since is not None else "",
        )
        self.on_change()

    def _stop_holding(self) -> None:
        if self._release is not None:
            self._release.cancel()
            self._release = None
        if self.holding_since is not None:
            log.info("runtimes are back after %.1f s of holding", time.time() - self.holding_since)
            self.holding_since = None
        self._held = []

    def _let_go(self) -> None:
        self._release = None
        log.warning("no passing runtime for %.0f s: letting the drop through", self.empty_grace)
        self.holding_since, self._held = None, []
        self._published = self._fresh()
        self.on_change()

    # The control planes' edges of this deployment: Kafka bridges, OIP gRPC fronts.

    @property
    def bridges(self) -> tuple[tuple[str, int], ...]:
        return self.edges.get(BRIDGE_SERVICE, ())

    async def watch_edges(self, service: str, kv_prefix: str) -> None:
        """Passing instances of `service` (a bridge, a front) of the control planes that share this KV prefix
        (one blocking query)."""

        async def health(index: int | None) -> tuple[Any, list[dict[str, Any]]]:
            return await self.client.health.service(service, index=index, wait=self.wait, passing=True)

        def take(entries: list[dict[str, Any]]) -> None:
            found = tuple(sorted({a for e in entries if (a := bridge_address(e, kv_prefix))}))
            if found != self.edges.get(service, ()):
                self.edges[service] = found
                log.info("%s=%s", service, ", ".join(f"{host}:{port}" for host, port in found) or "none")
                self.on_change()

        await watch(health, take, what=f"service {service}", on_error=self._failed, on_success=self._ok)
