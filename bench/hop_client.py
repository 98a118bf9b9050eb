"""The runtime's client for its hop to the local Envoy: aiohttp's against the SDK's own (runtime_sdk/hop.py).

One Envoy (one worker) answers a fixed 1 KB body at a Unix socket, as a sidecar's egress or the host's
shared listener would; this process sends it the same stage request through each client in turns,
32 at once, and counts the CPU this process spends per request (the client's share only; the Envoy's is
the same for both). Medians of the runs, and the ratio within each run.

`--against REV` adds runtime_sdk/hop.py as of git revision REV (loaded beside today's; it imports nothing of
the project) to the same turns: a change to the client measured against what came before it.

Run: .venv/bin/python -m bench.hop_client [--runs 5] [--requests 20000] [--against REV]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

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


def hop_at(revision: str) -> Any:
    """runtime_sdk/hop.py as of `revision`, as a module of its own."""
    text = subprocess.run(["git", "show", f"{revision}:runtime_sdk/hop.py"], capture_output=True, text=True, check=True)
    path = Path(tempfile.mkdtemp(prefix="mll-bench-hop-")) / "hop_before.py"
    path.write_text(text.stdout)
    spec = importlib.util.spec_from_file_location("hop_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["hop_before"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


async def one_run(socket: Path, requests: int, order: int, before: Any) -> dict[str, float]:
    hop = HopClient(path=str(socket))
    old = before.HopClient(path=str(socket)) if before is not None else None
    session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket)))

    async def with_hop() -> int:
        return (await hop.post("/pipelines/bench/v1/count", BODY, HEADERS)).status

    async def with_before() -> int:
        assert old is not None
        return int((await old.post("/pipelines/bench/v1/count", BODY, HEADERS)).status)

    async def with_aiohttp() -> int:
        async with session.post("http://sidecar/pipelines/bench/v1/count", data=BODY, headers=HEADERS) as resp:
            await resp.read()
            return resp.status

    result: dict[str, float] = {}
    clients = [("aiohttp", with_aiohttp), ("hop", with_hop), *([("before", with_before)] if old else [])]
    try:
        for name, post in clients[:: -1 if order % 2 else 1]:
            result[name] = await cpu_per_request(post, requests)
    finally:
        await hop.close()
        if old is not None:
            await old.close()
        await session.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--against", metavar="REV", help="also runtime_sdk/hop.py as of git revision REV")
    args = parser.parse_args()
    before = hop_at(args.against) if args.against else None
    folder = Path(tempfile.mkdtemp(prefix="mll-bench-hop-client-"))
    socket, port = folder / "egress.sock", processes.free_port()
    envoy = start(
        folder, "egress", over_pipe(envoy_config("egress", port, None, None, ""), socket, "ingress"), port, socket
    )
    runs = []
    try:
        for run in range(args.runs):
            runs.append(asyncio.run(one_run(socket, args.requests, run, before)))
            print(
                f"   run {run + 1}/{args.runs}: " + ", ".join(f"{k} {v:.1f} µs" for k, v in runs[-1].items()),
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
    if before is not None:
        then = median([r["before"] for r in runs])
        print(f"| hop.py at {args.against} | {then:.1f} |")
        print(f"hop / hop at {args.against}: {median([r['hop'] / r['before'] for r in runs]):.2f}x")


if __name__ == "__main__":
    main()
