"""Model monitoring's cost in the runtime: CPU per request with field profiles at 0 (off), 5 (the default) and
100 percent of requests, and the size of one model version's profile.

The runtime app (runtime_sdk.app, its own HTTP server) serves a classifier-shaped predict (a text and three
numbers in; a category, a confidence and a list out) in a process of its own; wrk sends the same POST with
32 connections over loopback. Each setting takes its turn in every run (the order turns around every other
run); what is counted is the server process's CPU per request, from /proc. Medians of the runs, and each
setting against off within each run.

Run: .venv/bin/python -m bench.profiling [--runs 5] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import median
from bench.wire_server import served_cpu
from controlplane.node import processes

SETTINGS = (0.0, 5.0, 100.0)
BODY = {"text": "the striker scored a brilliant goal", "length": 36, "hour": 14, "score": 0.73}
POST_LUA = f"""
wrk.method = "POST"
wrk.body = '{json.dumps(BODY)}'
wrk.headers["Content-Type"] = "application/json"
"""


def predict(payload: dict[str, Any]) -> dict[str, Any]:
    return {"category": "sports", "confidence": 0.91, "tokens": payload["text"].split()}


async def serve(percent: float, port: int) -> None:
    from runtime_sdk.app import Runtime, build_app
    from runtime_sdk.profiles import Profiler

    runtime = Runtime(predict, "bench", "v1", profiler=Profiler(percent) if percent else None)
    runtime.placement.mode = "always"  # a quick model: on the event loop, as the SDK places one
    runtime.ready = True
    await runtime.start()
    await build_app(runtime).listen_tcp("127.0.0.1", port)
    await asyncio.Event().wait()


def one(percent: float, seconds: int, script: str) -> dict[str, float]:
    port = processes.free_port()
    argv = [sys.executable, "-m", "bench.profiling", "--serve", str(percent), str(port)]
    return served_cpu(argv, port, f"http://127.0.0.1:{port}/predict", seconds, script)


def profile_size(requests: int = 10_000) -> int:
    """Bytes of one model version's window profile after `requests` profiled requests of this shape."""
    from runtime_sdk.profiles import Profiler

    clock = [0.0]
    profiler = Profiler(100, clock=lambda: clock[0])
    for i in range(requests):
        profiler.offer({**BODY, "hour": i % 24, "score": (i % 1000) / 1000}, predict(BODY))
    clock[0] += 60
    return len(json.dumps(profiler.export(-1)["windows"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--serve", nargs=2, metavar=("PERCENT", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(float(args.serve[0]), int(args.serve[1])))
        return
    script = Path(tempfile.mkdtemp(prefix="mll-bench-profiling-")) / "post.lua"
    script.write_text(POST_LUA)
    runs: list[dict[float, dict[str, float]]] = []
    for n in range(args.runs):
        run: dict[float, dict[str, float]] = {}
        for percent in SETTINGS[:: -1 if n % 2 else 1]:
            run[percent] = one(percent, args.seconds, str(script))
        print(
            f"run {n + 1}: "
            + ", ".join(f"{p:g}% {v['cpu_us']:.1f} us {v['req/s']:,.0f} req/s" for p, v in sorted(run.items())),
            flush=True,
        )
        runs.append(run)
    print("\n| profiled | CPU per request | requests/s | against off (median of the runs' ratios) |\n|---|---|---|---|")
    for p in SETTINGS:
        ratio = median([r[p]["cpu_us"] / r[0.0]["cpu_us"] for r in runs])
        print(
            f"| {p:g}% | {median([r[p]['cpu_us'] for r in runs]):.1f} us "
            f"| {median([r[p]['req/s'] for r in runs]):,.0f} | {ratio:.3f}x |"
        )
    print(f"\none version's profile of one window (10,000 requests of this shape): {profile_size():,} bytes")


if __name__ == "__main__":
    main()
