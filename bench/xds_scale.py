"""Scale: N ADS streams (grpc.aio clients in a separate process) on one xDS server.

Measures the time from setting a snapshot to every stream having received it,
the server's RSS with N streams, and after they disconnect.
Run: .venv/bin/python -m bench.xds_scale --streams 1000 2000 5000

`--per-node`: every stream its own node with its own snapshot, shaped like a sidecar's (an ingress and an
egress listener on its own ports, their two route configurations, six clusters and their endpoints, built with
the control plane's resource builders), subscribing to all four types as Envoy does and ACKing each response.
A change (new weights, new cluster names: every type changes) is built for every node, set, and timed from
the first snapshot set to each node's ACK of all four types (p50, p99, last), at the server's ACK book, and
the server's CPU per stream per push (what bounds a push when the Envoys are elsewhere: here the simulated
clients share the 2 cores with it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from bench.common import median
from controlplane.node import processes
from controlplane.translate import resources as r
from controlplane.xds.acks import AckBook
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.server import XdsServer
from controlplane.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot

STREAMS_PER_CHANNEL = 100
NEXT = 5  # clusters of the next stages a sidecar of the per-node mode routes to


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def snapshot(version: int) -> Snapshot:
    names = [f"model-{i}.v{version % 2}" for i in range(20)]
    return Snapshot.build(
        f"v{version}",
        clusters=[r.eds_cluster(n) for n in names],
        endpoints=[r.load_assignment(n, [r.tcp_address("127.0.0.1", 9000 + i)]) for i, n in enumerate(names)],
    )


def sidecar(node: int, version: int) -> Snapshot:
    """Node `node`'s snapshot, shaped like a sidecar's; `version` changes every type."""
    nexts = [f"model-{k}.v{version % 2}" for k in range(NEXT)]
    local = f"local-{node}"
    port = 10_000 + node % 50_000
    weights = [(name, 1 + (version + k) % 3) for k, name in enumerate(nexts)]
    return Snapshot.build(
        f"v{version}",
        clusters=[r.eds_cluster(local), *(r.eds_cluster(n) for n in nexts)],
        endpoints=[
            r.load_assignment(n, [r.tcp_address("127.0.0.1", port + 1 + k)]) for k, n in enumerate([local, *nexts])
        ],
        listeners=[
            r.http_listener("ingress", r.tcp_address("127.0.0.1", port), "ingress"),
            r.http_listener("egress", r.tcp_address("127.0.0.1", port + 10 + version % 2), "egress"),
        ],
        routes=[
            r.route_config("ingress", [r.weighted_route("/", [(local, 1)])]),
            r.route_config("egress", [r.weighted_route(f"/{n}", weights) for n in ("a", "b")]),
        ],
    )


class Acked:
    """The ACK book's listener: when each node has ACKed all four types of one version."""

    def __init__(self) -> None:
        self.version, self.nodes, self.done = "", 0, asyncio.Event()
        self.types: dict[str, set[str]] = {}
        self.at: dict[str, float] = {}

    def expect(self, version: str, nodes: int) -> None:
        self.version, self.nodes, self.types, self.at = version, nodes, {}, {}
        self.done.clear()

    def joined(self, node_id: str) -> None:
        pass

    def acked(self, node_id: str, group: str, type_url: str, version: str) -> None:
        if version != self.version or node_id in self.at:
            return
        types = self.types.setdefault(node_id, set())
        types.add(type_url)
        if len(types) == 4:
            self.at[node_id] = time.monotonic()
            if len(self.at) == self.nodes:
                self.done.set()


# --- client process -------------------------------------------------------------------------


async def per_node_client(address: str, streams: int) -> None:
    """Like Envoy: CDS and LDS wildcard, EDS and RDS by name, every response ACKed; reconnects with backoff."""
    failures = [0]

    def first(node: Any, index: int) -> list[Any]:
        names = {
            ENDPOINT: [f"local-{index}", *(f"model-{k}.v{v}" for k in range(NEXT) for v in (0, 1))],
            ROUTE: ["ingress", "egress"],
        }
        return [
            discovery_pb2.DiscoveryRequest(node=node, type_url=t, resource_names=names.get(t, []))
            for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)
        ]

    async def stream(stub: Any, index: int) -> None:
        node = base_pb2.Node(id=f"sim-{index}", cluster="bench")
        while True:
            outgoing: asyncio.Queue[Any] = asyncio.Queue()
            for request in first(node, index):
                outgoing.put_nowait(request)
            names = {r.type_url: list(r.resource_names) for r in first(node, index)}

            async def requests(queue: asyncio.Queue[Any] = outgoing) -> Any:
                while True:
                    yield await queue.get()

            try:
                async for response in stub.StreamAggregatedResources(requests()):
                    outgoing.put_nowait(
                        discovery_pb2.DiscoveryRequest(
                            type_url=response.type_url,
                            version_info=response.version_info,
                            response_nonce=response.nonce,
                            resource_names=names[response.type_url],
                        )
                    )
            except grpc.aio.AioRpcError:
                failures[0] += 1
                await asyncio.sleep(random.uniform(0.05, 0.5))

    async with opened(address, streams, stream):
        await asyncio.to_thread(sys.stdin.readline)  # the parent says when
        print(f"failures {failures[0]}", flush=True)


@contextlib.asynccontextmanager
async def opened(
    address: str, streams: int, stream: Callable[[Any, int], Coroutine[Any, Any, None]]
) -> AsyncIterator[None]:
    """`streams` streams run by `stream(stub, index)`, STREAMS_PER_CHANNEL to a connection (as separate Envoys
    would have: channels otherwise share one), until the block ends."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(0, streams, STREAMS_PER_CHANNEL)]
    stubs = [ads_pb2_grpc.AggregatedDiscoveryServiceStub(c) for c in channels]
    tasks = [asyncio.create_task(stream(stubs[i // STREAMS_PER_CHANNEL], i)) for i in range(streams)]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()


async def client_main(address: str, streams: int) -> None:
    seen: dict[str, set[int]] = {}  # version -> streams that have it
    failures: dict[str, int] = {}
    last_seen: dict[str, float] = {}
    changed = asyncio.Event()

    async def stream(stub: Any, index: int) -> None:
        outgoing: asyncio.Queue[Any] = asyncio.Queue()
        node = base_pb2.Node(id=f"sim-{index}", cluster="bench")
        await outgoing.put(discovery_pb2.DiscoveryRequest(node=node, type_url=CLUSTER))

        async def requests() -> Any:
            while True:
                yield await outgoing.get()

        while True:  # like Envoy: reconnect with backoff when a stream fails
            try:
                await consume(stub, requests(), outgoing, index)
            except grpc.aio.AioRpcError as err:
                failures[str(err.code())] = failures.get(str(err.code()), 0) + 1
                await asyncio.sleep(random.uniform(0.05, 0.5))
                outgoing = asyncio.Queue()
                await outgoing.put(discovery_pb2.DiscoveryRequest(node=node, type_url=CLUSTER))

    async def consume(stub: Any, requests: Any, outgoing: asyncio.Queue[Any], index: int) -> None:
        async for response in stub.StreamAggregatedResources(requests):
            await outgoing.put(
                discovery_pb2.DiscoveryRequest(
                    type_url=CLUSTER, version_info=response.version_info, response_nonce=response.nonce
                )
            )
            seen.setdefault(response.version_info, set()).add(index)
            last_seen[response.version_info] = time.time()
            changed.set()

    reported: set[str] = set()
    async with opened(address, streams, stream):
        stop = asyncio.ensure_future(asyncio.to_thread(sys.stdin.readline))  # the parent says when
        while not stop.done():
            waiter = asyncio.ensure_future(changed.wait())
            await asyncio.wait({waiter, stop}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            changed.clear()
            for version, holders in seen.items():
                if len(holders) >= streams and version not in reported:
                    reported.add(version)
                    print(f"reached {version} {last_seen[version]:.6f} {sum(failures.values())}", flush=True)


# --- server side (this process) -------------------------------------------------------------


async def measure(streams: int) -> dict[str, float]:
    cache, book, port = SnapshotCache(group_by="cluster"), AckBook(), processes.free_port()
    server = await XdsServer(cache, book, f"127.0.0.1:{port}").start()
    cache.set_snapshot("bench", snapshot(0))
    base_rss = rss_mib()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.xds_scale",
        "--client",
        f"127.0.0.1:{port}",
        str(streams),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdin is not None

    async def reached(version: str) -> float:
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), 300)).decode().split()  # type: ignore[union-attr]
            if line[:2] == ["reached", version]:
                return float(line[2])

    connect_started = time.time()
    await reached("v0")
    connect_s = time.time() - connect_started
    pushes = []
    for version in range(1, 4):
        await asyncio.sleep(0.5)
        started = time.time()
        cache.set_snapshot("bench", snapshot(version))
        pushes.append(await reached(f"v{version}") - started)
    with_streams = rss_mib()
    proc.stdin.write(b"stop\n")
    await proc.stdin.drain()
    await proc.wait()
    await asyncio.sleep(2)
    gc.collect()
    after = rss_mib()
    await server.stop(0)
    return {
        "streams": streams,
        "connect_s": connect_s,
        "push_s": median(pushes),
        "rss_base": base_rss,
        "rss_streams": with_streams,
        "rss_after": after,
    }


async def measure_per_node(streams: int) -> dict[str, float]:
    acked = Acked()
    cache, book, port = SnapshotCache(group_by="id"), AckBook(), processes.free_port()
    book.listen(acked)
    server = await XdsServer(cache, book, f"127.0.0.1:{port}").start()
    base_rss = rss_mib()
    for node in range(streams):
        cache.set_snapshot(f"sim-{node}", sidecar(node, 0))
    acked.expect("v0", streams)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.xds_scale",
        "--per-node-client",
        f"127.0.0.1:{port}",
        str(streams),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdin is not None
    started = time.monotonic()
    await asyncio.wait_for(acked.done.wait(), 600)
    connect_s = time.monotonic() - started
    builds, p50s, p99s, lasts, cpus = [], [], [], [], []
    for version in range(1, 4):
        await asyncio.sleep(1)
        built = time.monotonic()
        fresh = {f"sim-{node}": sidecar(node, version) for node in range(streams)}
        builds.append(time.monotonic() - built)
        acked.expect(f"v{version}", streams)
        started, cpu = time.monotonic(), time.process_time()
        for group, snap in fresh.items():
            cache.set_snapshot(group, snap)
        await asyncio.wait_for(acked.done.wait(), 600)
        cpus.append((time.process_time() - cpu) / streams)
        took = sorted(at - started for at in acked.at.values())
        p50s.append(took[len(took) // 2])
        p99s.append(took[max(0, -(-len(took) * 99 // 100) - 1)])
        lasts.append(took[-1])
        del fresh
    with_streams = rss_mib()
    proc.stdin.write(b"stop\n")
    await proc.stdin.drain()
    failures = (await proc.stdout.readline()).decode().split()[-1]
    await proc.wait()
    await server.stop(0)
    return {
        "streams": streams,
        "connect_s": connect_s,
        "build_s": median(builds),
        "p50": median(p50s),
        "p99": median(p99s),
        "last": median(lasts),
        "rss_base": base_rss,
        "rss": with_streams,
        "cpu_us": median(cpus) * 1e6,
        "failures": float(failures),
    }


async def per_node(counts: list[int]) -> None:
    print(
        "| streams | all connected and ACKed | build every node's change | set -> ACK of all 4 types, p50 | p99 "
        "| last | server CPU per stream per push | control plane RSS | stream failures |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in counts:
        m = await measure_per_node(n)
        print(
            f"| {n:,} | {m['connect_s']:.1f} s | {m['build_s']:.2f} s | {m['p50'] * 1000:,.0f} ms | "
            f"{m['p99'] * 1000:,.0f} ms | {m['last'] * 1000:,.0f} ms | {m['cpu_us']:,.0f} us | {m['rss']:,.0f} MiB | "
            f"{m['failures']:.0f} |",
            flush=True,
        )


async def main(counts: list[int]) -> None:
    header = f"{'streams':>8} {'all connected':>14} {'push to all (median of 3)':>26}"
    print(f"{header} {'RSS base':>9} {'RSS':>8} {'after':>8}")
    for n in counts:
        m = await measure(n)
        print(
            f"{n:>8} {m['connect_s']:>13.2f}s {m['push_s'] * 1000:>24.0f}ms "
            f"{m['rss_base']:>8.0f}M {m['rss_streams']:>7.0f}M {m['rss_after']:>7.0f}M",
            flush=True,
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        asyncio.run(client_main(sys.argv[2], int(sys.argv[3])))
    elif len(sys.argv) > 1 and sys.argv[1] == "--per-node-client":
        asyncio.run(per_node_client(sys.argv[2], int(sys.argv[3])))
    else:
        parser = argparse.ArgumentParser()
        parser.add_argument("--streams", type=int, nargs="+", default=[500, 1000, 2000, 5000])
        parser.add_argument("--per-node", action="store_true", help="a snapshot per node, shaped like a sidecar's")
        args = parser.parse_args()
        asyncio.run(per_node(args.streams) if args.per_node else main(args.streams))
