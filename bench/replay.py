"""Replay: how fast recorded requests go through a candidate, and what a replay costs live traffic.

The trivial three-stage pipeline (tokenize -> count -> score) on the local stack, every request logged.
2,000 requests are recorded; then, per run:
- throughput: `mllambda replay` of the 2,000 records into a candidate (score v2 on half) at --rate 1000
  with 16 at once: records judged per second, end to end (reading the log, the trial, the report);
- live p99: open-loop live traffic at LIVE_RATE/s for WINDOW s, once alone and once while a replay
  runs at its default rate (20/s) and concurrency (4); p50/p99 of the live requests.
Run: .venv/bin/python -m bench.replay [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.common import median, percentile, running_stack

LIVE_RATE, WINDOW, RECORDS = 100, 20, 2000
TEXTS = ["one", "one two", "a b c", "the quick brown fox", "w x y z q"]
M = "examples.trivial.models"


def stages(score: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"name": "tokenize", "variants": [{"model": "tokenize", "version": "v1"}]},
        {"name": "count", "variants": [{"model": "count", "version": "v1"}]},
        {"name": "score", "variants": score},
    ]


async def live(url: str, rate: int, seconds: float) -> list[float]:
    """Open loop: request i leaves at start + i / rate; the latency of each answered one (ms)."""
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(i: int, due: float) -> None:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            began = time.monotonic()
            async with session.post(url, json={"text": TEXTS[i % len(TEXTS)]}) as resp:
                await resp.read()
                if resp.status == 200:
                    latencies.append((time.monotonic() - began) * 1000)

        start = time.monotonic() + 0.1
        await asyncio.gather(*(one(i, start + i / rate) for i in range(int(rate * seconds))))
    return latencies


def replay(env: dict[str, str], candidate: Path, *flags: str) -> tuple[dict[str, Any], float]:
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "replay", "rp", "--candidate", str(candidate), "-o", "json", *flags],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode not in (0, 1):
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout), time.monotonic() - began


def one_run(folder: Path) -> dict[str, float]:
    stack = {
        "name": "replay",
        "runtimes": [
            {"model": "tokenize", "version": "v1", "target": f"{M}:tokenize"},
            {"model": "count", "version": "v1", "target": f"{M}:count"},
            {"model": "score", "version": "v1", "target": f"{M}:score"},
            {"model": "score", "version": "v2", "target": f"{M}:score_v2"},
        ],
        "pipelines": [
            {"name": "rp", "logging": {"percent": 100}, "stages": stages([{"model": "score", "version": "v1"}])}
        ],
    }
    candidate = folder / "candidate.yaml"
    split = [{"model": "score", "version": "v1", "weight": 1}, {"model": "score", "version": "v2", "weight": 1}]
    candidate.write_text(yaml.safe_dump({"name": "rp", "stages": stages(split)}))
    with running_stack(folder, stack) as (ports, env):
        gateway = f"http://127.0.0.1:{ports['gateway']}"
        env = {**env, "MLLAMBDA_GATEWAY": gateway}
        url = f"{gateway}/pipelines/rp"
        asyncio.run(live(url, 200, RECORDS / 200))  # recorded: RECORDS requests
        time.sleep(1)
        report, took = replay(env, candidate, "--last", str(RECORDS), "--rate", "1000", "--concurrency", "16")
        alone = asyncio.run(live(url, LIVE_RATE, WINDOW))
        with subprocess.Popen(
            [
                sys.executable,
                "-m",
                "controlplane.cli",
                "replay",
                "rp",
                "--candidate",
                str(candidate),
                "--last",
                str(RECORDS),
                "-o",
                "json",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        ) as running:
            time.sleep(3)  # its trial is pushed and it sends at its default rate
            during = asyncio.run(live(url, LIVE_RATE, WINDOW))
            running.kill()
        subprocess.run(
            [sys.executable, "-m", "controlplane.cli", "replay", "rp", "-o", "json"],
            env=env,
            capture_output=True,
            check=False,
        )
    return {
        "replayed per s": report["requests"] / took,
        "requests": report["requests"],
        "alone p50": percentile(alone, 50),
        "alone p99": percentile(alone, 99),
        "during p50": percentile(during, 50),
        "during p99": percentile(during, 99),
        "answered alone": len(alone),
        "answered during": len(during),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="mll-bench-replay-"))
    rows = []
    for run in range(args.runs):
        where = folder / f"run{run}"
        where.mkdir()
        rows.append(one_run(where))
        print(f"   run {run + 1}/{args.runs}: {rows[-1]}", flush=True)
    m = {k: median([r[k] for r in rows]) for k in rows[0]}
    print(f"\nmedians of {args.runs} runs; live load {LIVE_RATE}/s open loop for {WINDOW} s")
    print(
        "| replay of 2,000 records (rate 1000, 16 at once) | live p50 alone | live p99 alone "
        "| live p50 during a replay (20/s) | live p99 during | p99 ratio |\n|---|---|---|---|---|---|"
    )
    print(
        f"| {m['replayed per s']:.0f} records/s | {m['alone p50']:.1f} ms | {m['alone p99']:.1f} ms "
        f"| {m['during p50']:.1f} ms | {m['during p99']:.1f} ms "
        f"| {median([r['during p99'] / r['alone p99'] for r in rows]):.2f}x |"
    )
    print(f"(logs in {folder})")


if __name__ == "__main__":
    main()
