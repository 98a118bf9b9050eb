"""The control plane as the dashboard and /metrics see it: plain data, read-only.

Readers get a `PlaneView` taken at one moment and the observed traffic, never
the control plane object itself (go-control-plane's server sees its cache only
through an interface in the same way).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from contract.service import RuntimeService
from controlplane.consul.discovery import ConsulHealth
from controlplane.delivery.reconcile import LatencyHistogram
from controlplane.delivery.traffic import VariantTraffic, rate_limited
from controlplane.monitoring.callers import CallerCounts
from controlplane.pipeline.model import PipelineVersion
from controlplane.scaling.scaler import ScaleRow
from controlplane.xds.acks import TypeAck


@dataclass(frozen=True)
class PlaneView:
    pipelines: Sequence[PipelineVersion]  # live ones, current version each
    history: Mapping[str, Sequence[PipelineVersion]]
    runtimes: Sequence[RuntimeService]
    acks: Sequence[TypeAck]  # per (node, type)
    connected: frozenset[str]  # node ids with an open ADS stream
    streams_by_mode: Mapping[str, int]
    snapshot_versions: Mapping[str, str]  # node group -> current snapshot version
    snapshots_set: Mapping[str, int]  # node group -> snapshots set since start
    push_latency: LatencyHistogram
    admin_calls: Mapping[tuple[str, str], int]  # (method, code) -> count
    consul: ConsulHealth
    consul_ui: str
    envoy_admin: Mapping[str, str]  # node id -> its Envoy admin URL
    kafka_bridges: Sequence[tuple[str, int]]
    switch: Mapping[str, Mapping[str, Any]]  # pipeline -> its entry, pending and draining versions (switch.py)
    broken: Mapping[str, str]  # pipeline -> why its record in the store was skipped
    pipelines_held_since: float | None = None  # every pipeline vanished from KV at once: held
    translate_failed: Mapping[str, str] = field(default_factory=dict)  # node group -> why (it keeps its config)
    kafka_router_restarts: Mapping[str, int] = field(default_factory=dict)  # pipeline -> entry router restarts
    rollouts_driving: bool = False  # this control plane holds the rollout lock
    rollout_moves: int = 0  # rollout versions this control plane wrote
    readings: Sequence[tuple[float, Mapping[str, Any]]] = ()  # every Envoy's counters over time (monotonic clock)
    entered_at: Mapping[str, float] = field(default_factory=dict)  # pipeline -> when its version took traffic
    scaling: Sequence[ScaleRow] = ()  # autoscaled model versions (`--autoscale`)
    control_planes: Mapping[str, Any] = field(default_factory=dict)  # the records they share (peer_acks.py)
    stack: Sequence[Mapping[str, Any]] = ()  # the local stack's processes, as its supervisor records them
    replay_reports: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)  # newest first
    replays_running: Mapping[str, str] = field(default_factory=dict)  # pipeline -> the id of its running replay
    callers: Sequence[CallerCounts] = ()  # admission per caller key and model version, read from the runtimes
    monitoring: Callable[[], Sequence[Mapping[str, Any]]] = lambda: ()  # per model version: fields, drift (asked)
    monitoring_page: Callable[[], Sequence[Mapping[str, Any]]] = lambda: ()  # ... with bins and history to draw

    def rate_limited(self) -> dict[str, int]:
        """Requests each pipeline's rate_limit refused at the gateway, as of the last reading (every 5 s)."""
        return rate_limited([v.pipeline.name for v in self.pipelines], self.readings[-1][1] if self.readings else {})


class PlaneReader(Protocol):
    def view(self) -> PlaneView: ...

    async def traffic(self) -> list[VariantTraffic]: ...  # counts since each Envoy started (for /metrics)

    async def recent_traffic(self) -> list[VariantTraffic]: ...  # over a recent window of the version in traffic

    async def failing_deployments(self) -> Sequence[Any]: ...  # models.store.Trouble of deployed versions


def envoy_admin_urls(runtimes: Sequence[RuntimeService], gateway_admin_port: int) -> dict[str, str]:
    """Each Envoy's admin page, for the dashboard's links (on this host's loopback)."""
    urls = {i.service_id: f"http://127.0.0.1:{i.envoy_admin_port}/" for i in runtimes}
    if gateway_admin_port:
        urls["gateway"] = f"http://127.0.0.1:{gateway_admin_port}/"
    return urls


MAX_STACK_FILE = 1024 * 1024
STACK_FIELDS = ("name", "pid", "state", "restarts", "exits_in_a_row", "last_exit", "last_lines")


def stack_processes(path: str) -> list[dict[str, Any]]:
    """The local stack's processes from its supervisor's record (none when not run by `mllambda up`)."""
    if not path:
        return []
    try:
        with open(path, "rb") as handle:
            record = json.loads(handle.read(MAX_STACK_FILE))
    except (OSError, ValueError):
        return []
    found = record.get("processes") if isinstance(record, dict) else None
    return [
        {k: p[k] for k in STACK_FIELDS if k in p}
        for p in (found if isinstance(found, list) else [])[:1000]
        if isinstance(p, dict)
    ]
