"""Deployments + runtimes -> a snapshot per node group in the cache, and what each Envoy has of it.

Translation is pure (translate/); this is the step around it that remembers
which pipeline versions each group's snapshots route, in the order they were
set, so that an Envoy's ACK says which versions it routes now: the staged
change protocol (switch.py) waits on that, and `describe` shows it. It also
counts snapshots set per group and times each push until its ACK.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from prometheus_client.core import HistogramMetricFamily

from contract.service import RuntimeService
from controlplane.delivery.replays import REPLAY_BASE
from controlplane.translate.pipelines import Carried, Deployment, Memo, Options, carried, translate
from controlplane.translate.resources import KAFKA_BROKER_FILTER
from controlplane.xds.acks import AckBook
from controlplane.xds.cache import InconsistentSnapshot, SnapshotCache
from controlplane.xds.snapshot import CLUSTER, ROUTE, short

log = logging.getLogger("mllambda")
KEEP_VERSIONS = 64  # snapshot versions remembered per group (older ACKs count as "has nothing newer")
KEEP_SET_TIMES = 10_000  # (group, version) set times kept for push latency
GATEWAY_WARM = 0.5  # seconds a new cluster is in the gateway's config before a route may use it
NACK_SHOWN = 160  # characters of an Envoy's NACK text quoted in a report


class LatencyHistogram:
    """Cumulative buckets, exported as a Prometheus histogram."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self.counts = [0] * len(self.BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.total += 1
        self.sum += seconds
        for i, bound in enumerate(self.BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        buckets = [(str(b), float(c)) for b, c in zip(self.BUCKETS, self.counts, strict=True)]
        buckets.append(("+Inf", float(self.total)))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)


Pair = tuple[str, int]  # (pipeline, version)
Elsewhere = Callable[[str, Pair, float | None], str | None]


class GroupLedger:
    """One node group's snapshots in the order they were set, and since when each pipeline version is routed.



    An Envoy that acknowledged routes of snapshot number s routes pipeline
    version (P, N) iff P/N has been carried since a snapshot numbered <= s. An ACK
    of a snapshot too old to be remembered predates everything carried now.
    """

    def __init__(self) -> None:
        self.count = 0
        self.number: dict[str, int] = {}  # snapshot version -> its number (the last KEEP_VERSIONS)
        self.carried: Carried = frozenset()
        self.since: dict[Pair, int] = {}  # carried now -> first snapshot number carrying it
        self.gone: dict[Pair, int] = {}  # carried before -> snapshot number that dropped it

    def record(self, snapshot_version: str, pairs: Carried) -> None:
        if snapshot_version not in self.number:
            self.count += 1
            self.number[snapshot_version] = self.count
            while len(self.number) > KEEP_VERSIONS:
                del self.number[next(iter(self.number))]
        if pairs == self.carried:
            return
        n = self.number[snapshot_version]
        for pair in pairs - self.carried:
            self.since[pair] = n
            self.gone.pop(pair, None)
        for pair in self.carried - pairs:
            del self.since[pair]
            self.gone[pair] = n
        while len(self.gone) > KEEP_SET_TIMES:
            del self.gone[next(iter(self.gone))]
        self.carried = pairs

    def routes(self, acked_version: str, pair: Pair) -> bool:
        """Does an Envoy that acknowledged `acked_version` route `pair`?"""
        n = self.number.get(acked_version)
        return n is not None and pair in self.since and n >= self.since[pair]

    def left(self, acked_version: str, pair: Pair) -> bool:
        """Has an Envoy that acknowledged `acked_version` stopped routing `pair`?"""
        if pair in self.carried:
            return False
        n = self.number.get(acked_version)
        return pair not in self.gone or (n is not None and n >= self.gone[pair])

    def newest(self, acked_version: str, name: str) -> int:
        """The newest version of pipeline `name` an Envoy that acknowledged `acked_version` routes (0: none)."""
        routed = (v for p, v in self.since if p == name and v < REPLAY_BASE and self.routes(acked_version, (p, v)))
        return max(routed, default=0)  # a replay's candidate is not the pipeline's version


class Reconciler:
    def __init__(self, cache: SnapshotCache, acks: AckBook, options: Options) -> None:
        self.cache = cache
        self.acks = acks
        self.options = options
        self.ledgers: dict[str, GroupLedger] = {}
        self.gateway_clusters: dict[str, float] = {}  # cluster in the gateway's snapshot -> since when (monotonic)
        self.translated: Carried = frozenset()  # every pipeline version the last reconcile routed
        self.passing: frozenset[str] = frozenset()  # runtimes that take requests (their sidecars' groups)
        self.snapshots_set: dict[str, int] = {}
        self.failed: dict[str, str] = {}  # node group -> why its translation failed (it keeps its last snapshot)
        self._failed_pairs: dict[str, Carried] = {}
        self._memo: Memo = {}  # sidecar inputs -> their snapshot (translate's cache)
        self._reported: dict[str, str] = {}  # failures already logged (each is logged once)
        self.push_latency = LatencyHistogram()
        self._set_at: dict[tuple[str, str], float] = {}
        acks.listen(self)

    def reconcile(
        self,
        deployments: Sequence[Deployment],
        instances: Sequence[RuntimeService],
        bridges: tuple[tuple[str, int], ...],
        parked: tuple[tuple[str, str, int], ...] = (),
        signatures: tuple[tuple[str, str], ...] = (),
        fronts: tuple[tuple[str, int], ...] = (),
    ) -> None:
        with_filter = frozenset(n for n, ext in self.acks.extensions.items() if KAFKA_BROKER_FILTER in ext)
        options = replace(
            self.options,
            kafka_filter_nodes=with_filter,
            bridges=bridges,
            parked=parked,
            signatures=signatures,
            fronts=fronts,
        )
        failed: dict[str, str] = {}
        snapshots = translate(deployments, instances, options, failed, self._memo)
        pairs = carried(deployments, instances, options)
        self._reported, self.failed, self._failed_pairs = self.failed, {}, {}
        for group, error in failed.items():  # it keeps its last snapshot; the other groups go on
            self._fail(group, error, pairs.get(group, frozenset()))
        self.translated = frozenset((v.pipeline.name, v.version) for d in deployments for v in d.hops())
        self.passing = frozenset(i.service_id for i in instances if i.passing)
        for group in set(self.ledgers) - set(snapshots) - set(failed):
            del self.ledgers[group]  # a runtime that is gone
        gateway = snapshots.get(self.options.gateway_group)
        if gateway is not None:
            now = time.monotonic()
            names = gateway.of_type(CLUSTER).by_name
            self.gateway_clusters = {name: self.gateway_clusters.get(name, now) for name in names}
        for group, snapshot in snapshots.items():
            previous = self.cache.get(group)
            if previous is not None and previous.version == snapshot.version:
                self.ledgers.setdefault(group, GroupLedger()).record(snapshot.version, pairs[group])
                continue
            try:
                self.cache.set_snapshot(group, snapshot)
            except InconsistentSnapshot as err:  # a translation bug: this group keeps its config
                self._fail(group, f"inconsistent snapshot: {err}"[:200], pairs[group])
                continue
            self.ledgers.setdefault(group, GroupLedger()).record(snapshot.version, pairs[group])
            self._set_at[(group, snapshot.version)] = time.monotonic()
            while len(self._set_at) > KEEP_SET_TIMES:
                del self._set_at[next(iter(self._set_at))]
            self.snapshots_set[group] = self.snapshots_set.get(group, 0) + 1
            log.info("snapshot group=%s version=%s routes=%s", group, snapshot.version, sorted(pairs[group]))
        for group in self.cache.forget_unwatched(set(snapshots) | set(self.failed)):
            self.snapshots_set.pop(group, None)

    def _fail(self, group: str, error: str, pairs: Carried) -> None:
        if self._reported.get(group) != error:
            log.error("translation failed group=%s: %s; it keeps its last config", group, error)
        self.failed[group] = error
        self._failed_pairs[group] = pairs

    def _acked(self, node_id: str, type_url: str = ROUTE) -> str | None:
        return next((s.acked_version for s in self.acks.for_node(node_id) if s.type_url == type_url), None)

    def gateway_missing(self, clusters: frozenset[str]) -> list[str]:
        """Clusters the gateway may not have warmed yet.

        Envoy applies a route at once but warms a new cluster until its endpoints
        arrive (503 "cluster not found" meanwhile). Its endpoints follow the
        cluster on the same ADS stream within milliseconds; an ACK cannot say
        when, because a cluster the Envoy still held is not sent again. So a
        cluster gets GATEWAY_WARM seconds in the gateway's snapshot before a
        route may use it.
        """
        group = self.options.gateway_group
        if not self.acks.is_connected(group):
            return []
        now = time.monotonic()
        return [
            f"{group} (warming cluster {name})"
            for name in sorted(clusters)
            if now - self.gateway_clusters.get(name, now) < GATEWAY_WARM
        ]

    def missing_acks(self, pair: Pair, elsewhere: Elsewhere = lambda group, pair, gone: None) -> list[str]:
        """Sidecars that must route `pair` and have not acknowledged it yet.

        Those streaming here are judged by their ACKs; `elsewhere(group, pair,
        when it left here)` says why one that does not is waited for (peer_acks.py).
        """
        if pair not in self.translated:
            return ["its first translation"]
        missing = []
        for group, ledger in self.ledgers.items():
            if group == self.options.gateway_group or pair not in ledger.carried:
                continue
            if not self.acks.is_connected(group):
                if group not in self.passing:
                    continue  # no request goes there: nothing to wait for
                why = elsewhere(group, pair, self.acks.gone_since(group))
                missing += [f"{group} ({why})"] if why else []
                continue
            acked = self._acked(group)
            if acked is None or not ledger.routes(acked, pair):
                missing.append(group + self._nack_note(group))
        missing += [f"{g} (translation failed: {e})" for g, e in self.failed.items() if pair in self._failed_pairs[g]]
        return sorted(missing)

    def local_view(self) -> tuple[frozenset[str], frozenset[Pair]]:
        """(sidecar groups streaming here, versions every one of them that routes it has acknowledged): the record
        other control planes read (peer_acks.py)."""
        here = {g: ledger for g, ledger in self.ledgers.items() if g != self.options.gateway_group}
        here = {g: ledger for g, ledger in here.items() if self.acks.is_connected(g)}
        acked = {g: self._acked(g) for g in here}
        failed = {pair for pairs in self._failed_pairs.values() for pair in pairs}

        def ready(pair: Pair) -> bool:
            return pair not in failed and all(
                (a := acked[g]) is not None and ledger.routes(a, pair)
                for g, ledger in here.items()
                if pair in ledger.carried
            )

        return frozenset(here), frozenset(p for p in self.translated if ready(p))

    def rejected(self, pair: tuple[str, int]) -> list[str]:
        """Envoys that `pair` waits for and that refuse their config (a NACK no ACK has followed): "node rejected ..."

        Envoy re-sends nothing for a resource that did not change, so the NACK may
        name an earlier config with the same listener: what counts is that the node
        still holds out.
        """
        found = []
        for group, ledger in self.ledgers.items():
            if pair not in ledger.carried or not self.acks.is_connected(group):
                continue
            acked = self._acked(group)
            if acked is not None and ledger.routes(acked, pair):
                continue
            for status in self.acks.for_node(group):
                if status.nack_error:
                    found.append(f"{group} rejected {short(status.type_url)}: {' '.join(status.nack_error.split())}")
        return sorted(found)

    def _nack_note(self, node_id: str) -> str:
        """Why a node may never get there: the last config it rejected, shortened."""
        rejected = [s for s in self.acks.for_node(node_id) if s.nack_error]
        if not rejected:
            return ""
        error = " ".join(rejected[0].nack_error.split())  # one line, whatever Envoy sent
        shown = error[:NACK_SHOWN] + ("..." if len(error) > NACK_SHOWN else "")
        return f" (rejected {short(rejected[0].type_url)}: {shown})"

    def gateway_routes(self, pair: Pair) -> bool:
        """The gateway has acknowledged a config that enters `pair` (a replay's candidate)."""
        ledger = self.ledgers.get(self.options.gateway_group)
        acked = self._acked(self.options.gateway_group)
        return ledger is not None and acked is not None and ledger.routes(acked, pair)

    def gateway_left(self, pair: tuple[str, int]) -> bool:
        """The gateway no longer sends new requests into `pair` (or no gateway is connected here)."""
        group = self.options.gateway_group
        ledger = self.ledgers.get(group)
        if ledger is None or not self.acks.is_connected(group):
            return True
        acked = self._acked(group)
        return acked is not None and ledger.left(acked, pair)

    def carried_version(self, group: str, snapshot_version: str, name: str) -> int:
        """The newest version of pipeline `name` routed by a node of `group` that acknowledged `snapshot_version`."""
        ledger = self.ledgers.get(group)
        return ledger.newest(snapshot_version, name) if ledger else 0

    def snapshot_versions(self) -> dict[str, str]:
        return {group: s.version for group in self.cache.groups() if (s := self.cache.get(group)) is not None}

    def joined(self, node_id: str) -> None:
        pass

    def acked(self, node_id: str, group: str, type_url: str, version: str) -> None:
        """An ACK: how long the version took from being set to being acknowledged (push latency)."""
        set_at = self._set_at.get((group, version))
        elapsed = time.monotonic() - set_at if set_at is not None else None
        if elapsed is not None and elapsed < 60:  # not a re-ACK after a reconnect
            self.push_latency.observe(elapsed)
