"""Shared helpers for the benchmarks: percentiles, medians of runs, a real Envoy."""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

from controlplane import processes
from controlplane.sidecar import render_bootstrap
from controlplane.tools import find_envoy


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def start_sidecar_envoy(node_id: str, xds_addr: str, delta: bool) -> processes.ManagedProcess:
    envoy = find_envoy()
    assert envoy is not None, "run ./dev bootstrap first"
    folder = Path(tempfile.mkdtemp(prefix="mll-bench-"))
    admin = processes.free_port()
    config = folder / "envoy.yaml"
    config.write_text(render_bootstrap(node_id, "bench", xds_addr, admin, delta=delta))
    return processes.ManagedProcess("envoy", processes.envoy_argv(envoy, config), folder / "envoy.log").start()
