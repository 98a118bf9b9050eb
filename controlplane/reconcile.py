"""Pipelines + runtimes -> a snapshot per node group in the cache, and what was pushed when.

Translation is pure (translate/); this is the step around it that remembers:
which pipeline versions each snapshot carries (so `describe` can say which
version an Envoy serves from the config version it acknowledged), how often
each group got a new snapshot, and how long a push took until its ACK.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace

from prometheus_client.core import HistogramMetricFamily

from contract.service import RuntimeService
from controlplane.store import PipelineVersion
from controlplane.translate.pipelines import Options, translate
from controlplane.translate.resources import KAFKA_BROKER_FILTER
from controlplane.xds.acks import AckBook
from controlplane.xds.cache import SnapshotCache

log = logging.getLogger("mllambda")
KEEP_VERSIONS = 8  # snapshot versions remembered per group
KEEP_SET_TIMES = 10_000  # (group, version) set times kept for push latency


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


class Reconciler:
    def __init__(self, cache: SnapshotCache, acks: AckBook, options: Options) -> None:
        self.cache = cache
        self.acks = acks
        self.options = options
        # group -> snapshot version -> {pipeline name: pipeline version} it carries (the last few)
        self.deployed: dict[str, dict[str, dict[str, int]]] = {}
        self.snapshots_set: dict[str, int] = {}
        self.push_latency = LatencyHistogram()
        self._set_at: dict[tuple[str, str], float] = {}
        acks.on_ack(self._observe_push)

    def reconcile(
        self,
        pipelines: Sequence[PipelineVersion],
        instances: Sequence[RuntimeService],
        bridges: tuple[tuple[str, int], ...],
    ) -> None:
        versions = {v.pipeline.name: v.version for v in pipelines}
        with_filter = frozenset(n for n, ext in self.acks.extensions.items() if KAFKA_BROKER_FILTER in ext)
        options = replace(self.options, kafka_filter_nodes=with_filter, bridges=bridges)
        snapshots = translate([v.pipeline for v in pipelines], instances, options)
        for group, snapshot in snapshots.items():
            self._remember(group, snapshot.version, versions)
            previous = self.cache.get(group)
            if previous is not None and previous.version == snapshot.version:
                continue
            self.cache.set_snapshot(group, snapshot)
            self._set_at[(group, snapshot.version)] = time.monotonic()
            while len(self._set_at) > KEEP_SET_TIMES:
                del self._set_at[next(iter(self._set_at))]
            self.snapshots_set[group] = self.snapshots_set.get(group, 0) + 1
            log.info("snapshot group=%s version=%s pipelines=%s", group, snapshot.version, versions)

    def carried_version(self, group: str, snapshot_version: str, name: str) -> int:
        """The version of pipeline `name` inside a group's snapshot version (0: not in it)."""
        return self.deployed.get(group, {}).get(snapshot_version, {}).get(name, 0)

    def snapshot_versions(self) -> dict[str, str]:
        return {group: s.version for group in self.cache.groups() if (s := self.cache.get(group)) is not None}

    def _observe_push(self, node_id: str, group: str, type_url: str, version: str) -> None:
        set_at = self._set_at.get((group, version))
        elapsed = time.monotonic() - set_at if set_at is not None else None
        if elapsed is not None and elapsed < 60:  # not a re-ACK after a reconnect
            self.push_latency.observe(elapsed)

    def _remember(self, group: str, snapshot_version: str, versions: dict[str, int]) -> None:
        """Same config, newer pipeline versions: the node serves them already. Bounded per group."""
        history = self.deployed.setdefault(group, {})
        history.pop(snapshot_version, None)
        history[snapshot_version] = versions
        while len(history) > KEEP_VERSIONS:
            del history[next(iter(history))]
