"""Autoscaling under a load step, end to end: `python -m bench.autoscale [--runs 3]`.

`mllambda up` runs the NLP pipeline (mTLS, real gateway, sidecars, Consul and
control plane). The classifier runs on a simulated accelerator
(bench/device_model.py: one request at a time, 25 ms each), so one replica
serves at most 40 requests a second. The load is open loop: 10/s for 10 s,
50/s (5x) for 60 s, 10/s until the version is back at min_replicas and 5 s more (at most
40 s). "Once scaled" is the last 15 s of the high load: it starts 45 s after the step, the
30 s a scale-up may take (UP_WITHIN_S) and 15 s for the backlog built meanwhile to drain.
Reported per run and as medians: when the autoscaler decided and when the second replica
passed, the peak, p99 before, during and after, when the version was back at min_replicas,
and failures.
tests/test_autoscale_e2e.py runs the same scenario once and asserts on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.common import median, nlp_stack
from controlplane.config import PROJECT_ROOT
from controlplane.node import processes

NLP = PROJECT_ROOT / "examples" / "nlp"
LOW, HIGH = 10, 50  # requests a second: one replica serves 40
HIGH_S, SCALED_S = 60, 15  # how long the high load lasts; its last part, measured as "once scaled"
UP_WITHIN_S = 30  # from the step to a second replica passing, on a busy machine (the test's bound)
TEXTS = ["the striker scored a brilliant goal", "the new phone has a fast chip", "the pasta was delicious"]


def stack_file(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    stack = nlp_stack()
    stack["runtimes"] = [r for r in stack["runtimes"] if r["version"] == "v1"]
    for runtime in stack["runtimes"]:
        if runtime["model"] == "classifier":  # on the simulated device: this environment's code, not a package
            del runtime["package"], runtime["manifest"]
            runtime["target"] = "bench.device_model:classify_on_device"
            runtime["loader"] = "examples.nlp.models:load_classifier"
            runtime["autoscale"] = {
                "min_replicas": 1,
                "max_replicas": 4,
                "target_in_flight": 1,
                "up_window": 2,
                "down_window": 15,
            }
    stack["kafka"] = False
    names = ("consul", "xds", "admin", "gateway", "gateway_admin", "controlplane_metrics")
    ports = {k: processes.free_port() for k in names}
    stack["ports"] = ports
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(stack))
    return path, ports


async def load(
    url: str, rate: float, seconds: float, out: list[tuple[float, float, int]], done: Callable[[], bool] | None = None
) -> None:
    """Open loop: request i leaves at start + i/rate whatever the others do; (sent, latency, status) each.
    Once `done()` is true no further request leaves."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one(i: int, due: float) -> None:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if done is not None and done():
                return
            sent = time.monotonic()
            try:
                async with session.post(url, json={"text": TEXTS[i % len(TEXTS)]}) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            out.append((sent, time.monotonic() - sent, status))

        start = time.monotonic() + 0.05
        await asyncio.gather(*(one(i, start + i / rate) for i in range(int(rate * seconds))))


def scaling(ports: dict[str, int], model: str = "classifier") -> dict[str, Any]:
    status, body = processes.http_get(f"http://127.0.0.1:{ports['controlplane_metrics']}/api/status", timeout=5)
    if status != 200:
        raise RuntimeError(f"/api/status answered {status}")
    return next(r for r in json.loads(body)["scaling"] if r["model"] == model)


def p99(rows: list[tuple[float, float, int]]) -> float:
    latencies = sorted(latency for _, latency, _ in rows)
    return 1000 * latencies[int(0.99 * (len(latencies) - 1))]


async def watch(ports: dict[str, int], seen: list[tuple[float, int, int]], stop: asyncio.Event) -> None:
    """(time, wanted, passing) of classifier:v1 every half second."""
    while not stop.is_set():
        row = await asyncio.to_thread(scaling, ports)
        seen.append((time.monotonic(), row["wanted"], row["passing"]))
        await asyncio.sleep(0.5)


def first(seen: list[tuple[float, int, int]], after: float, test: Any) -> float | None:
    return next((at - after for at, wanted, passing in seen if at >= after and test(wanted, passing)), None)


def launch(path: Path, tmp_path: Path) -> subprocess.Popen[bytes]:
    """`mllambda up -f` in the foreground (the local scaler lives there), its output in up.log."""
    env = {**os.environ, "MLLAMBDA_STATE_DIR": str(tmp_path / "state")}
    with open(tmp_path / "up.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "up", "-f", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_ROOT,
            env=env,
            start_new_session=True,
        )


async def until_up(up: subprocess.Popen[bytes], tmp_path: Path) -> None:
    deadline = time.monotonic() + 240
    while "Ctrl-C stops everything" not in (tmp_path / "up.log").read_text():
        if up.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the stack did not come up:\n" + (tmp_path / "up.log").read_text()[-3000:])
        await asyncio.sleep(0.5)


def stop_stack(up: subprocess.Popen[bytes]) -> None:
    if up.poll() is None:
        os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)


async def load_step(
    tmp_path: Path, then: Callable[[subprocess.Popen[bytes], dict[str, int]], Awaitable[None]] | None = None
) -> dict[str, Any]:
    """The whole scenario on a fresh stack; `then` runs before the stack stops. The figures it saw."""
    path, ports = stack_file(tmp_path)
    up = launch(path, tmp_path)
    url = f"http://127.0.0.1:{ports['gateway']}/pipelines/nlp"
    try:
        await until_up(up, tmp_path)
        before = scaling(ports)
        seen: list[tuple[float, int, int]] = []
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(ports, seen, stop))
        low: list[tuple[float, float, int]] = []
        await load(url, LOW, 10, low)
        step = time.monotonic()
        high: list[tuple[float, float, int]] = []
        await load(url, HIGH, HIGH_S, high)
        after = time.monotonic()
        settle: list[tuple[float, float, int]] = []

        def settled() -> bool:  # back at min_replicas for 5 s: a replica that left has had its chance to fail one
            back = first(seen, after, lambda wanted, passing: wanted == 1 and passing == 1)
            return back is not None and time.monotonic() > after + back + 5

        await load(url, LOW, 40, settle, settled)
        stop.set()
        await watcher

        decided_up = first(seen, step, lambda wanted, passing: wanted >= 2)
        second_passing = first(seen, step, lambda wanted, passing: passing >= 2)
        peak = max(passing for at, _, passing in seen if step <= at <= after)
        back_to_min = first(seen, after, lambda wanted, passing: wanted == 1 and passing == 1)
        scaled_p99 = p99([r for r in high if r[0] >= step + HIGH_S - SCALED_S])
        failed = {
            "low": sum(s != 200 for *_, s in low),
            "high": sum(s != 200 for *_, s in high),
            "after": sum(s != 200 for *_, s in settle),
        }
        figures = {
            "load_rps": {"low": LOW, "high": HIGH},
            "device_ms": 25,
            "decided_up_after_s": decided_up,
            "second_replica_passing_after_s": second_passing,
            "peak_replicas_passing": peak,
            "p99_ms": {
                "low": p99(low),
                "high_first_10s": p99([r for r in high if r[0] < step + 10]),
                "high_last_15s": scaled_p99,
                "after": p99(settle),
            },
            "back_to_min_after_load_s": back_to_min,
            "failed": failed,
            "requests": len(low) + len(high) + len(settle),
            "last_decision": scaling(ports)["reason"],
        }
        figures["at_start"] = {"wanted": before["wanted"], "passing": before["passing"]}
        figures["scaled_in_logged"] = "autoscale classifier:v1: 1 -> " in (tmp_path / "up.log").read_text()
        if then is not None:
            await then(up, ports)
        return figures
    finally:
        stop_stack(up)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = []
    for run in range(args.runs):
        figures = asyncio.run(load_step(Path(tempfile.mkdtemp(prefix="mll-bench-autoscale-"))))
        runs.append(figures)
        print(f"   run {run + 1}/{args.runs}: {json.dumps(figures)}", flush=True)
    keys = [
        ("decided_up_after_s", 1),
        ("second_replica_passing_after_s", 1),
        ("peak_replicas_passing", 0),
        ("back_to_min_after_load_s", 1),
    ]
    print(f"\nload step 10/s -> 50/s -> 10/s, classifier on a 25 ms device, median of {args.runs} runs")
    for key, digits in keys:
        values = [r[key] for r in runs if r[key] is not None]
        print(f"- {key}: {median(values):.{digits}f} (runs: {', '.join(f'{v:.{digits}f}' for v in values)})")
    for phase in ("low", "high_first_10s", "high_last_15s", "after"):
        values = [r["p99_ms"][phase] for r in runs]
        print(f"- p99 {phase}: {median(values):.0f} ms (runs: {', '.join(f'{v:.0f}' for v in values)})")
    print(f"- failed: {sum(sum(r['failed'].values()) for r in runs)} of {sum(r['requests'] for r in runs)}")


if __name__ == "__main__":
    main()
