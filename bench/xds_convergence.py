"""Convergence: snapshot set -> the real Envoy's ACK of it, for SotW and delta side by side.

100 pipelines' worth of resources (100 clusters with endpoints, one listener,
one route config with 100 weighted routes); each change moves the weights of
one route and one endpoint. Run: .venv/bin/python -m bench.xds_convergence
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.common import median, percentile, start_sidecar_envoy
from controlplane.node import processes
from controlplane.translate import resources as r
from controlplane.xds.acks import AckBook
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.server import XdsServer
from controlplane.xds.snapshot import ROUTE, Snapshot

PIPELINES = 100


def build(version: int, listen: int) -> Snapshot:
    names = [f"model-{i}.v1" for i in range(PIPELINES)]
    routes = [
        r.weighted_route(f"/pipelines/p{i}", [(name, 50 + (version + i) % 50), (names[(i + 1) % PIPELINES], 50)])
        for i, name in enumerate(names)
    ]
    return Snapshot.build(
        f"v{version}",
        clusters=[r.eds_cluster(n) for n in names],
        endpoints=[
            r.load_assignment(n, [r.tcp_address("127.0.0.1", 20000 + (i + version) % 1000)])
            for i, n in enumerate(names)
        ],
        listeners=[r.http_listener("ingress", r.tcp_address("127.0.0.1", listen), "ingress")],
        routes=[r.route_config("ingress", routes)],
    )


class TimedBook(AckBook):
    """Records when each route version is ACKed."""

    def __init__(self) -> None:
        super().__init__()
        self.acked_at: dict[str, float] = {}
        self.changed = asyncio.Event()

    def ack(self, node_id: str, group: str, type_url: str, version: str) -> None:
        super().ack(node_id, group, type_url, version)
        if type_url == ROUTE:
            self.acked_at.setdefault(version, time.perf_counter())
            self.changed.set()

    async def wait_acked(self, version: str) -> float:
        while version not in self.acked_at:
            self.changed.clear()
            await self.changed.wait()
        return self.acked_at[version]


async def one_run(mode: str, changes: int) -> list[float]:
    cache, book, port = SnapshotCache(), TimedBook(), processes.free_port()
    server = await XdsServer(cache, book, f"127.0.0.1:{port}").start()
    listen = processes.free_port()
    cache.set_snapshot("bench-node", build(0, listen))
    envoy = start_sidecar_envoy("bench-node", f"127.0.0.1:{port}", delta=mode == "delta")
    try:
        await book.wait_acked("v0")
        samples = []
        for version in range(1, changes + 1):
            snapshot = build(version, listen)
            started = time.perf_counter()
            cache.set_snapshot("bench-node", snapshot)
            samples.append((await book.wait_acked(f"v{version}") - started) * 1000)
        return samples
    finally:
        envoy.stop()
        await server.stop(0)


async def main(runs: int, changes: int) -> None:
    results: dict[str, list[tuple[float, float]]] = {"sotw": [], "delta": []}
    for run in range(runs):
        for mode in ("sotw", "delta"):  # interleaved, so noise hits both alike
            samples = await one_run(mode, changes)
            results[mode].append((percentile(samples, 50), percentile(samples, 99)))
            print(f"run {run + 1} {mode:>5}: p50 {results[mode][-1][0]:.2f} ms  p99 {results[mode][-1][1]:.2f} ms")
    print(f"\nmedian of {runs} runs, {changes} changes each, {PIPELINES} pipelines of resources:")
    for mode, rows in results.items():
        print(f"  {mode:>5}: p50 {median([p for p, _ in rows]):.2f} ms   p99 {median([p for _, p in rows]):.2f} ms")
    sotw99, delta99 = median([p for _, p in results["sotw"]]), median([p for _, p in results["delta"]])
    print(f"  delta/sotw p99 ratio: {delta99 / sotw99:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--changes", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.changes))
