"""The staged change protocol: a pipeline version takes traffic only once every hop has it; the old one drains.

Each Envoy acknowledges on its own, so pushing a change everywhere at once lets
the gateway send requests into hops a sidecar does not have yet, and takes hops
away from requests still on their way. Instead, per pipeline:

1. A new current version is *pending*: the sidecars get its hops (paths carry
   the version, `/pipelines/P/vN/S`), added beside the ones in use; the gateway
   keeps entering the old version.
2. Once every sidecar that has hops of it has acknowledged them (the ones
   streaming to another control plane as that one's record says: peer_acks.py;
   for Kafka: every hop topic's consumer group has a member), it becomes the
   *entry*: the gateway (or the Kafka bridge) sends new requests into it.
3. The previous entry *drains*: from the moment the gateway acknowledged the
   switch, its hops stay as long as a request may take (the pipeline's total
   timeout) plus a margin; then they go.

A deleted pipeline loses its gateway route at once and drains the same way. A
version that is not ready stays pending (the old one keeps serving) and is
reported with the nodes it waits for; a newer apply replaces it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controlplane.pipeline.model import PipelineVersion
from controlplane.translate.pipelines import Deployment

log = logging.getLogger("mllambda.switch")
DRAIN_MARGIN = 1.0  # seconds beyond the longest a request may take
SLOW_AFTER = 30.0  # a version pending this long is reported as stuck
Pair = tuple[str, int]
SHOWN = 20  # nodes named in a report


@dataclass
class Track:
    """One pipeline's versions on the data path."""

    entry: PipelineVersion | None = None
    pending: PipelineVersion | None = None
    pending_since: float = 0.0
    waiting_for: tuple[str, ...] = ()
    reported_slow: bool = False
    entered_at: float = 0.0  # when the entry took traffic (clock of the switchboard)
    draining: dict[int, PipelineVersion] = field(default_factory=dict)
    drain_until: dict[int, float] = field(default_factory=dict)  # set once the gateway has left that version

    def routed(self) -> tuple[PipelineVersion, ...]:
        versions = {v.version: v for v in [*self.draining.values(), self.entry, self.pending] if v is not None}
        return tuple(versions[n] for n in sorted(versions))


class Switchboard:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.tracks: dict[str, Track] = {}

    def update(self, live: Sequence[PipelineVersion], in_traffic: bool = False) -> None:
        """The store's current versions. `in_traffic`: take them as entered already (a control plane's first read)."""
        now = self.clock()
        names = set()
        for current in live:
            name = current.pipeline.name
            names.add(name)
            track = self.tracks.setdefault(name, Track())
            if in_traffic and track.entry is None:
                track.entry, track.entered_at = current, now
            elif track.entry is not None and track.entry.version == current.version:
                track.pending = None
            elif track.pending is None or track.pending.version != current.version:
                # A pending version the gateway never entered has no requests in flight: replaced outright.
                track.pending, track.pending_since, track.reported_slow = current, now, False
                log.info("pipeline=%s version=%d pending", name, current.version)
        for name in set(self.tracks) - names:
            track = self.tracks[name]
            if track.entry is not None:  # deleted: no new requests; what is in flight drains
                track.draining[track.entry.version] = track.entry
                log.info("pipeline=%s deleted; version %d drains", name, track.entry.version)
            track.entry = track.pending = None

    def advance(
        self, missing: Callable[[PipelineVersion], Sequence[str]], gateway_left: Callable[[Pair], bool]
    ) -> bool:
        """Move pending versions in and drained ones out. True if the data path must change."""
        changed, now = False, self.clock()
        for name, track in list(self.tracks.items()):
            if track.pending is not None:
                track.waiting_for = tuple(missing(track.pending))
                if not track.waiting_for:
                    if track.entry is not None:
                        track.draining[track.entry.version] = track.entry
                    track.entry, track.pending, changed = track.pending, None, True
                    track.entered_at = now
                    log.info(
                        "pipeline=%s version=%d in traffic after %.2fs",
                        name,
                        track.entry.version,
                        now - track.pending_since,
                    )
                elif now - track.pending_since > SLOW_AFTER and not track.reported_slow:
                    track.reported_slow = True
                    log.warning(
                        "pipeline=%s version=%d still not in traffic after %.0fs: waiting for %s",
                        name,
                        track.pending.version,
                        SLOW_AFTER,
                        ", ".join(track.waiting_for),
                    )
            for number, version in list(track.draining.items()):
                if number not in track.drain_until and gateway_left((name, number)):
                    track.drain_until[number] = now + version.pipeline.timeout_ms() / 1000 + DRAIN_MARGIN
                if now >= track.drain_until.get(number, float("inf")):
                    del track.draining[number], track.drain_until[number]
                    changed = True
                    log.info("pipeline=%s version=%d drained", name, number)
            if track.entry is None and track.pending is None and not track.draining:
                del self.tracks[name]
        return changed

    def deployments(self) -> list[Deployment]:
        return [Deployment(t.entry, t.routed()) for _, t in sorted(self.tracks.items())]

    def in_traffic(self, sees_gateway: bool) -> list[PipelineVersion]:
        """The versions clients are sent into, as far as this control plane can tell (for the rollout driver).

        It knows when the gateway streams to it (the switch saw the ACK). When the
        gateway streams to another control plane, the newest version is taken as in
        traffic: that one's switch lets it in within a moment.
        """
        found = [t.entry if sees_gateway else t.pending or t.entry for t in self.tracks.values()]
        return [v for v in found if v is not None]

    def stuck(self, after: float) -> list[tuple[PipelineVersion, PipelineVersion]]:
        """(pending, entry) of versions waiting longer than `after` seconds while an older one serves."""
        now = self.clock()
        return [
            (t.pending, t.entry)
            for t in self.tracks.values()
            if t.pending is not None and t.entry is not None and now - t.pending_since > after
        ]

    def pending(self) -> list[PipelineVersion]:
        return [t.pending for t in self.tracks.values() if t.pending is not None]

    def report(self, name: str) -> dict[str, Any]:
        """What /api/status and `describe` show of a pipeline's switch."""
        track = self.tracks.get(name)
        if track is None:
            return {"entry": None, "pending": None, "waiting_for": [], "pending_seconds": 0, "draining": []}
        return {
            "entry": track.entry.version if track.entry else None,
            "pending": track.pending.version if track.pending else None,
            "waiting_for": list(track.waiting_for[:SHOWN])
            + ([f"... {len(track.waiting_for) - SHOWN} more"] if len(track.waiting_for) > SHOWN else []),
            "pending_seconds": round(self.clock() - track.pending_since, 3) if track.pending else 0,
            "draining": sorted(track.draining),
        }

    def notes(self, name: str) -> list[str]:
        """The switch in sentences, for `mllambda describe`."""
        return switch_notes(self.report(name))


def switch_notes(report: Mapping[str, Any]) -> list[str]:
    """A report (see `Switchboard.report`) in sentences: what a pending version waits for, what drains."""
    notes = []
    if report.get("pending"):
        waiting = ", ".join(report["waiting_for"]) or "the next check"
        serving = f"version {report['entry']}" if report["entry"] else "nothing"
        notes.append(
            f"version {report['pending']} is not in traffic yet ({report['pending_seconds']:.1f}s): "
            f"waiting for {waiting}; {serving} serves meanwhile"
        )
    if report.get("draining"):
        notes.append("draining requests still on version " + ", ".join(str(n) for n in report["draining"]))
    return notes
