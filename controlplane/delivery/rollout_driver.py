"""Drives rollouts: one control plane at a time, elected with a Consul session lock.

The state of every rollout is the pipeline itself (its head version's `rollout`
block and variants, in Consul KV), so a control plane that takes over the lock
continues from the step the last driver wrote: it only starts the step's
analysis window afresh. Each move is written with a compare-and-set on the
version it judged, so a person's `apply` in between wins and the driver looks
again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import consul.aio

from controlplane.consul.lock import SessionLock, lead
from controlplane.delivery.rollouts import Agreement, Spot, Window, judge, spots, where
from controlplane.delivery.traffic import ClusterStats, p99_same_seconds
from controlplane.pipeline.model import Pipeline, PipelineVersion
from controlplane.pipeline.store import NotCurrent, PipelineStore, WriteConflict

log = logging.getLogger("mllambda.rollouts")
TICK = 0.5


@dataclass
class Watched:
    """The analysis window of one (pipeline, version, stage): counters when this driver first saw it live."""

    since: float
    requests: int
    errors: int


def lock_key(kv_prefix: str) -> str:
    return kv_prefix.rstrip("/") + "-rollouts/driver"


class RolloutDriver:
    def __init__(
        self,
        client: consul.aio.Consul,
        store: PipelineStore,
        kv_prefix: str,
        entries: Callable[[], Sequence[PipelineVersion]],
        stats: Callable[[], Awaitable[Mapping[str, ClusterStats]]],
        holder: str,
        refused: Callable[[], Sequence[tuple[PipelineVersion, PipelineVersion, str]]] = lambda: [],
        replays: Callable[[str], Sequence[Mapping[str, Any]]] = lambda name: (),
        agreement: Callable[[str, frozenset[str], str], Agreement | None] = lambda c, b, f: None,
        output_drift: Callable[[str, frozenset[str]], tuple[str, float] | None] = lambda c, b: None,
    ) -> None:
        self.store = store
        self.lock = SessionLock(client, lock_key(kv_prefix), holder, "rollout driver")
        self.entries = entries  # the versions clients are sent into now
        self.stats = stats
        self.refused = refused  # (pending, entry, why): versions an Envoy rejected while the entry serves
        self.replays = replays  # a pipeline's replay reports, newest first (a rollout's gate reads them)
        self.agreement = agreement  # (candidate, baseline clusters, field) -> (pairs, share) as its shadow
        self.output_drift = output_drift  # (candidate, baseline clusters) -> (field, PSI) of their answers
        self.moves = 0
        self._windows: dict[tuple[str, int, Spot], Watched] = {}
        self._since = 0.0  # when the lock was taken: the windows belong to that holding

    async def run(self) -> None:
        """Forever: hold the lock (or wait for it), and while holding it, drive."""
        await lead(self.lock, self._round)

    async def _round(self, holding: bool) -> float:
        if not holding:
            return 1.0
        if self._since != self.lock.taken:  # windows start afresh for whoever takes over
            self._windows.clear()
            self._since = self.lock.taken
        await self._tick()
        return TICK

    @property
    def driving(self) -> bool:
        return self.lock.holding

    async def _tick(self) -> None:
        for pending, entry, why in self.refused():
            # The head goes back to what every Envoy took; the rejection stays visible (describe, status).
            cause = f"auto-rollback {pending.pipeline.name} v{pending.version}: {why}"[:200]
            await self._write(entry.pipeline, cause, pending.version)
        live = [(v, spot) for v in self.entries() for spot in spots(v.pipeline)]
        keep = {(v.pipeline.name, v.version, spot) for v, spot in live}
        for key in set(self._windows) - keep:
            del self._windows[key]
        if not live:
            return
        stats, moved = await self.stats(), set()
        for version, spot in live:
            if version.pipeline.name in moved:
                continue  # one move per version: the next head is judged afresh
            window = self._window(version, spot, stats)
            variants, rollout = where(version.pipeline, spot)
            assert rollout is not None
            agreed = None
            if rollout.min_agreement and rollout.step == 0:
                baseline = frozenset(v.cluster for v in rollout.baseline or variants)
                agreed = self.agreement(rollout.candidate.cluster, baseline, rollout.agreement_on)
            move = judge(version.pipeline, spot, window, self.replays(version.pipeline.name), agreed)
            if move is not None:
                moved.add(version.pipeline.name)
                await self._write(move.pipeline, move.cause, version.version)

    async def _write(self, pipeline: Pipeline, cause: str, expect: int) -> None:
        try:
            written, created = await self.store.apply(pipeline, cause=cause, expect=expect)
        except (WriteConflict, NotCurrent):
            return  # someone else wrote first: judge the new head next time
        if created:
            self.moves += 1
            log.info("pipeline=%s version=%d %s", pipeline.name, written.version, cause)

    def _window(self, version: PipelineVersion, spot: Spot, stats: Mapping[str, ClusterStats]) -> Window:
        variants, rollout = where(version.pipeline, spot)
        assert rollout is not None
        candidate = stats.get(rollout.candidate.cluster, ClusterStats())
        key = (version.pipeline.name, version.version, spot)
        seen = self._windows.setdefault(key, Watched(time.monotonic(), candidate.requests, candidate.errors))
        candidate_p99, baseline_p99 = p99_same_seconds(
            candidate, [stats.get(v.cluster) for v in rollout.baseline or variants]
        )
        drifted = None
        if rollout.max_drift and rollout.step:
            drifted = self.output_drift(
                rollout.candidate.cluster, frozenset(v.cluster for v in rollout.baseline or variants)
            )
        return Window(
            output_drift=drifted,
            requests=max(0, candidate.requests - seen.requests),
            errors=max(0, candidate.errors - seen.errors),
            seconds=time.monotonic() - seen.since,
            candidate_p99_ms=candidate_p99,
            baseline_p99_ms=baseline_p99,
        )
