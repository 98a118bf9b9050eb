"""Scale: N ADS streams (grpc.aio clients in a separate process) on one xDS server.

Measures the time from setting a snapshot to every stream having received it,
the server's RSS with N streams, and after they disconnect.
Run: .venv/bin/python -m bench.xds_scale --streams 1000 2000 5000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import subprocess
import sys
import time
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
from controlplane.xds.snapshot import CLUSTER, Snapshot

STREAMS_PER_CHANNEL = 100


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


# --- client process -------------------------------------------------------------------------


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

    # Separate connections, as separate Envoys would have (channels otherwise share one).
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(0, streams, STREAMS_PER_CHANNEL)]
    tasks = [
        asyncio.create_task(stream(ads_pb2_grpc.AggregatedDiscoveryServiceStub(channels[i // STREAMS_PER_CHANNEL]), i))
        for i in range(streams)
    ]
    reported: set[str] = set()
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
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()


# --- server side (this process) -------------------------------------------------------------


async def measure(streams: int) -> dict[str, float]:
    cache, book, port = SnapshotCache(group_by="cluster"), AckBook(), processes.free_port()
    server = await XdsServer(cache, book, f"127.0.0.1:{port}").start()
    cache.set_snapshot("bench", snapshot(0))
    base_rss = rss_mib()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.xds_scale", "--client", f"127.0.0.1:{port}", str(streams),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
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
    else:
        parser = argparse.ArgumentParser()
        parser.add_argument("--streams", type=int, nargs="+", default=[500, 1000, 2000, 5000])
        asyncio.run(main(parser.parse_args().streams))
