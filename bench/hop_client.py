"""The runtime's client for its hop to the local Envoy: aiohttp's against the SDK's own (runtime_sdk/hop.py).

One Envoy (one worker) answers a fixed 1 KB body at a Unix socket, as a sidecar's egress or the host's
shared listener would; this process sends it the same stage request through each client in turns,
32 at once, and counts the CPU this process spends per request (the client's share only; the Envoy's is
the same for both). Medians of the runs, and the ratio within each run.

Run: .venv/bin/python -m bench.hop_client [--runs 5] [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from bench.common import median
from bench.istio_hop import envoy_config, over_pipe, start
from controlplane.node import processes
from runtime_sdk.ensemble import hop_headers
from runtime_sdk.hop import HopClient

BODY = json.dumps({"tokens": ["the", "quick", "brown", "fox", "jumps"]})
HEADERS = hop_headers({"x-mll-stage": "count", "x-request-id": "0" * 36}, {})
CONCURRENT = 32

Post = Callable[[], Awaitable[int]]


async def cpu_per_request(post: Post, requests: int) -> float:
    """CPU µs this process spends per request, `CONCURRENT` at a time."""

    async def worker(n: int) -> None:
        for _ in range(n):
            assert await post() == 200

    await asyncio.gather(*(worker(200) for _ in range(CONCURRENT)))  # warm: connections open
    started = time.process_time()
    await asyncio.gather(*(worker(requests // CONCURRENT) for _ in range(CONCURRENT)))
    return (time.process_time() - started) / (requests // CONCURRENT * CONCURRENT) * 1e6


async def one_run(socket: Path, requests: int, order: int) -> dict[str, float]:
    hop = HopClient(path=str(socket))
    session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket)))

    async def with_hop() -> int:
        return (await hop.post("/pipelines/bench/v1/count", BODY, HEADERS)).status

    async def with_aiohttp() -> int:
        async with session.post("http://sidecar/pipelines/bench/v1/count", data=BODY, headers=HEADERS) as resp:
            await resp.read()
            return resp.status

    result: dict[str, float] = {}
    try:
        for name, post in [("aiohttp", with_aiohttp), ("hop", with_hop)][:: -1 if order % 2 else 1]:
            result[name] = await cpu_per_request(post, requests)
    finally:
        await hop.close()
        await session.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="mll-bench-hop-client-"))
    socket, port = folder / "egress.sock", processes.free_port()
    envoy = start(
        folder, "egress", over_pipe(envoy_config("egress", port, None, None, ""), socket, "ingress"), port, socket
    )
    runs = []
    try:
        for run in range(args.runs):
            runs.append(asyncio.run(one_run(socket, args.requests, run)))
            print(
                f"   run {run + 1}/{args.runs}: aiohttp {runs[-1]['aiohttp']:.1f} µs, hop {runs[-1]['hop']:.1f} µs",
                flush=True,
            )
    finally:
        envoy.stop()
    aio, hop = median([r["aiohttp"] for r in runs]), median([r["hop"] for r in runs])
    ratio = median([r["hop"] / r["aiohttp"] for r in runs])
    print(f"\nclient CPU per request, {CONCURRENT} at a time, median of {args.runs} runs of {args.requests}")
    print("| client | CPU µs per request |\n|---|---|")
    print(f"| aiohttp ClientSession | {aio:.1f} |\n| runtime_sdk.hop.HopClient | {hop:.1f} |")
    print(f"hop / aiohttp: {ratio:.2f}x (median of per-run ratios)")


if __name__ == "__main__":
    main()
