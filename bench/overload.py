"""Overload with callers that give up: what a model spends on requests nobody waits for any more.

A two-stage pipeline (a device-bound model -> echo) through the real stack. The model holds a simulated
accelerator 25 ms per request, one at a time (40/s at most). The load is open loop at twice that, 80/s
for 20 s, and every client gives up after 0.5 s (it closes its connection, as a caller's timeout does).
Reported per system: the answers the clients got in time (goodput), the model's calls by outcome (run to
its end, or stopped because the caller had gone), and the calls of the next stage. Systems: ML Lambda as
it comes (no limit on requests in predict), and with `--max-in-flight 4` on the model's runtime (one more
is a retriable 503 at once).

`--against REV` runs the same against ML Lambda as of git revision REV (a worktree), in turns.
`--flow`: flow control. The same model shared by three pipelines: `shared` (fair shares by an x-caller header),
`gold` (critical) and `bulk` (sheddable). A light caller at a sixth of twice capacity, alone and then beside a
heavy one at five times its rate; `gold` at 3/4 of capacity alone and then beside `bulk` at 5/4. Clients give up
after 2 s. Reported: the light caller's and gold's goodput beside the other as a share of alone, their p99, and
the share of bulk refused; without flow control and with `--max-in-flight 1 --queue 4` on the model.

Run: .venv/bin/python -m bench.overload [--runs 3] [--against REV] [--flow]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import checkout, median, running_stack, runtime_codes
from controlplane.config import PROJECT_ROOT

RATE, SECONDS, GIVE_UP = 80, 20, 0.5
MODEL = """
import threading, time
_device = threading.Lock()

def held(payload):
    with _device:  # one request at a time holds the device, as a GPU-bound model does
        time.sleep(0.025)
    return payload
"""


async def load(url: str) -> Counter[str]:
    """Open loop: request i leaves at start + i / RATE; each gives up after GIVE_UP seconds."""
    seen: Counter[str] = Counter()
    timeout = aiohttp.ClientTimeout(total=GIVE_UP)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(due: float) -> None:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            try:
                async with session.post(url, json={"n": 1}) as resp:
                    await resp.read()
                    seen[str(resp.status)] += 1
            except TimeoutError:
                seen["gave up"] += 1
            except aiohttp.ClientError:
                seen["failed"] += 1

        start = time.monotonic() + 0.1
        await asyncio.gather(*(one(start + i / RATE) for i in range(RATE * SECONDS)))
    return seen


def one_run(folder: Path, root: Path, args: list[str]) -> dict[str, float]:
    (folder / "overload_model.py").write_text(MODEL)
    stack = {
        "name": "overload",
        "runtimes": [
            {"model": "device", "version": "v1", "target": "overload_model:held", "args": args},
            {"model": "echo", "version": "v1", "target": "examples.trivial.models:echo"},
        ],
        "pipelines": [
            {
                "name": "busy",
                "stages": [{"name": m, "variants": [{"model": m, "version": "v1"}]} for m in ("device", "echo")],
            }
        ],
    }
    with running_stack(folder, stack, {"PYTHONPATH": str(folder)}, root) as (ports, _):
        url = f"http://127.0.0.1:{ports['gateway']}/pipelines/busy"
        seen = asyncio.run(load(url))
        time.sleep(SECONDS)  # long enough for a backlog of dead requests to be worked through
        device, echo = runtime_codes(ports["consul"], "device"), runtime_codes(ports["consul"], "echo")
    return {
        "in time": seen["200"] / SECONDS,
        "gave up": seen["gave up"],
        "model ran": device["200"],
        "model stopped": device["499"],
        "next stage ran": sum(echo.values()),
        "refused": seen["503"],
        "other": sum(n for k, n in seen.items() if k not in ("200", "503", "gave up")),
    }


# Flow control (`--flow`): the same device model shared by three pipelines, two callers and two priorities.
FLOW_ARGS = ["--max-in-flight=1", "--queue=4"]
LIGHT, HEAVY = 80 / 6, 80 * 5 / 6  # twice the model's capacity together, one sending five times the other's
GOLD, BULK = 30, 50  # a critical pipeline at 3/4 of capacity, a sheddable one beside it
FLOW_SECONDS, FLOW_GIVE_UP = 12, 2.0


async def open_loop(url: str, rate: float, headers: dict[str, str]) -> tuple[Counter[str], list[float]]:
    """Open loop at `rate` for FLOW_SECONDS; each request gives up after FLOW_GIVE_UP s. (codes, seconds of 200s)"""
    seen: Counter[str] = Counter()
    took: list[float] = []
    timeout = aiohttp.ClientTimeout(total=FLOW_GIVE_UP)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(due: float) -> None:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            try:
                async with session.post(url, json={"n": 1}, headers=headers) as resp:
                    await resp.read()
                    seen[str(resp.status)] += 1
                    if resp.status == 200:
                        took.append(time.monotonic() - due)
            except TimeoutError:
                seen["gave up"] += 1
            except aiohttp.ClientError:
                seen["failed"] += 1

        start = time.monotonic() + 0.1
        await asyncio.gather(*(one(start + i / rate) for i in range(int(rate * FLOW_SECONDS))))
    return seen, took


def p99(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.99)] * 1000 if values else float("nan")


def flow_run(folder: Path, args: list[str]) -> dict[str, float]:
    """Alone, then beside the other: the light caller's and the critical pipeline's goodput and p99."""
    (folder / "overload_model.py").write_text(MODEL)
    stages = [{"name": m, "variants": [{"model": m, "version": "v1"}]} for m in ("device", "echo")]
    stack = {
        "name": "flow",
        "runtimes": [
            {"model": "device", "version": "v1", "target": "overload_model:held", "args": args},
            {"model": "echo", "version": "v1", "target": "examples.trivial.models:echo"},
        ],
        "pipelines": [
            {"name": "shared", "stages": stages, "fairness": {"header": "x-caller"}},
            {"name": "gold", "stages": stages, "priority": "critical"},
            {"name": "bulk", "stages": stages, "priority": "sheddable"},
        ],
    }
    found: dict[str, float] = {}
    with running_stack(folder, stack, {"PYTHONPATH": str(folder)}) as (ports, _):
        base = f"http://127.0.0.1:{ports['gateway']}/pipelines"

        async def phases() -> None:
            shared, light, heavy = f"{base}/shared", {"x-caller": "light"}, {"x-caller": "heavy"}
            alone = await open_loop(shared, LIGHT, light)
            await asyncio.sleep(3)
            (beside, _) = await asyncio.gather(open_loop(shared, LIGHT, light), open_loop(shared, HEAVY, heavy))
            await asyncio.sleep(3)
            gold_alone = await open_loop(f"{base}/gold", GOLD, {})
            await asyncio.sleep(3)
            gold, bulk = await asyncio.gather(open_loop(f"{base}/gold", GOLD, {}), open_loop(f"{base}/bulk", BULK, {}))
            found.update(
                {
                    "light goodput": len(beside[1]) / max(1, len(alone[1])),
                    "light p99 ms": p99(beside[1]),
                    "light p99 alone ms": p99(alone[1]),
                    "gold goodput": len(gold[1]) / max(1, len(gold_alone[1])),
                    "gold p99 ms": p99(gold[1]),
                    "bulk shed": bulk[0]["503"] / max(1, sum(bulk[0].values())),
                }
            )

        asyncio.run(phases())
    return found


def flow_main(runs: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="mll-bench-flow-"))
    systems = {"ML Lambda, no flow control": [], f"ML Lambda, {' '.join(FLOW_ARGS)}": FLOW_ARGS}
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    for run in range(runs):
        for index, (name, flags) in enumerate(list(systems.items())[:: -1 if run % 2 else 1]):
            where = folder / f"run{run}-{index}"
            where.mkdir()
            rows[name].append(flow_run(where, flags))
            print(f"   run {run + 1}/{runs} {name}: {rows[name][-1]}", flush=True)
    print(
        f"\nA model of 40/s; light {LIGHT:.1f}/s beside heavy {HEAVY:.1f}/s (pipeline `shared`, fair shares by"
        f" x-caller); critical `gold` {GOLD}/s beside sheddable `bulk` {BULK}/s; {FLOW_SECONDS} s each, clients"
        f" give up after {FLOW_GIVE_UP:g} s; medians of {runs} runs"
    )
    print(
        "| system | light: goodput vs alone | light p99 (alone) | critical: goodput vs alone | critical p99 "
        "| sheddable refused |\n|---|---|---|---|---|---|"
    )
    for name, found in rows.items():
        m = {k: median([r[k] for r in found]) for k in found[0]}
        print(
            f"| {name} | {m['light goodput']:.2f} | {m['light p99 ms']:.0f} ms ({m['light p99 alone ms']:.0f} ms) "
            f"| {m['gold goodput']:.2f} | {m['gold p99 ms']:.0f} ms | {m['bulk shed']:.0%} |"
        )
    print(f"(logs in {folder})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--against", metavar="REV", help="also ML Lambda as of git revision REV")
    parser.add_argument("--flow", action="store_true", help="priorities and fair shares, with and without")
    args = parser.parse_args()
    if args.flow:
        flow_main(args.runs)
        return
    folder = Path(tempfile.mkdtemp(prefix="mll-bench-overload-"))
    systems = {"ML Lambda": (PROJECT_ROOT, []), "ML Lambda, --max-in-flight 4": (PROJECT_ROOT, ["--max-in-flight=4"])}
    if args.against:
        systems[f"ML Lambda at {args.against}"] = (checkout(args.against), [])
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    for run in range(args.runs):
        for index, (name, (root, flags)) in enumerate(list(systems.items())[:: -1 if run % 2 else 1]):
            where = folder / f"run{run}-{index}"
            where.mkdir()
            rows[name].append(one_run(where, root, flags))
            print(f"   run {run + 1}/{args.runs} {name}: {rows[name][-1]}", flush=True)
    print(
        f"\n{RATE}/s for {SECONDS} s against a model that serves 40/s; clients give up after {GIVE_UP} s;"
        f" medians of {args.runs} runs"
    )
    keys = ("in time", "gave up", "refused", "model ran", "model stopped", "next stage ran", "other")
    print(
        "| system | answers in time per s | gave up | 503 at once | model ran to its end | model stopped "
        "| next stage ran | other |\n|---|---|---|---|---|---|---|---|"
    )
    for name, found in rows.items():
        m: dict[str, Any] = {k: median([r[k] for r in found]) for k in keys}
        print(
            f"| {name} | {m['in time']:.1f} | {m['gave up']:.0f} | {m['refused']:.0f} | {m['model ran']:.0f} "
            f"| {m['model stopped']:.0f} | {m['next stage ran']:.0f} | {m['other']:.0f} |"
        )
    print(f"(logs in {folder})")


if __name__ == "__main__":
    main()
