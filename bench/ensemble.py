"""An ensemble stage costs its slowest member, not the sum of its members.

One stack (the default, mTLS on every hop) serves three pipelines after the same first stage:
  chain:    tokenize -> wait_40 -> wait_60     (the two models one after the other: ~ the sum)
  ensemble: tokenize -> {wait_40, wait_60}     (both members at once: ~ the slower one)
  slowest:  tokenize -> wait_60                (the slower member alone: the floor)
Requests go one at a time, the three pipelines in turns within each run; median of the runs' p50/p99.
Run: .venv/bin/python -m bench.ensemble [--runs 3] [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import median, percentile, running_stack

PIPELINES = ("chain", "ensemble", "slowest")
TEXT = {"text": "the quick brown fox"}


async def wait_40(payload: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0.04)
    return payload


async def wait_60(payload: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0.06)
    return payload


def _one(model: str) -> dict[str, Any]:
    return {"variants": [{"model": model, "version": "v1"}]}


def stack() -> dict[str, Any]:
    first = {"name": "tokenize", **_one("tokenize")}
    members = [{"name": "a", **_one("wait-40")}, {"name": "b", **_one("wait-60")}]
    return {
        "name": "bench-ensemble",
        "runtimes": [
            {"model": "tokenize", "version": "v1", "target": "examples.trivial.models:tokenize"},
            {"model": "wait-40", "version": "v1", "target": "bench.ensemble:wait_40"},
            {"model": "wait-60", "version": "v1", "target": "bench.ensemble:wait_60"},
        ],
        "pipelines": [
            {"name": "chain", "stages": [first, {"name": "a", **_one("wait-40")}, {"name": "b", **_one("wait-60")}]},
            {"name": "ensemble", "stages": [first, {"name": "both", "members": members}]},
            {"name": "slowest", "stages": [first, {"name": "b", **_one("wait-60")}]},
        ],
    }


async def latencies(gateway: int, pipeline: str, requests: int) -> list[float]:
    url = f"http://127.0.0.1:{gateway}/pipelines/{pipeline}"
    found = []
    async with aiohttp.ClientSession() as session:
        for _ in range(requests):
            started = time.perf_counter()
            async with session.post(url, json=TEXT) as resp:
                await resp.read()
                assert resp.status == 200, (pipeline, resp.status, await resp.text())
            found.append((time.perf_counter() - started) * 1000)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="mll-bench-ensemble-"))
    p50: dict[str, list[float]] = {p: [] for p in PIPELINES}
    p99: dict[str, list[float]] = {p: [] for p in PIPELINES}
    with running_stack(folder, stack()) as (ports, _):
        for pipeline in PIPELINES:
            asyncio.run(latencies(ports["gateway"], pipeline, 20))  # warm: connections, placement
        for _ in range(args.runs):
            for pipeline in PIPELINES:
                found = asyncio.run(latencies(ports["gateway"], pipeline, args.requests))
                p50[pipeline].append(percentile(found, 50))
                p99[pipeline].append(percentile(found, 99))
    print(f"{'pipeline':<10}{'p50 ms':>10}{'p99 ms':>10}   (median of {args.runs} runs x {args.requests} requests)")
    for pipeline in PIPELINES:
        print(f"{pipeline:<10}{median(p50[pipeline]):>10.1f}{median(p99[pipeline]):>10.1f}")
    ensemble = median(p50["ensemble"])
    print(f"\nensemble / slowest member alone: {ensemble / median(p50['slowest']):.2f}x (p50)")
    print(f"ensemble / members in a chain:   {ensemble / median(p50['chain']):.2f}x (p50)")


if __name__ == "__main__":
    main()
