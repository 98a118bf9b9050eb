"""Autoscaling end to end: `mllambda up` with the NLP pipeline, a load step, and back.

The classifier runs on a simulated accelerator (tests/scaling_models.py: one
request at a time, 25 ms each), so one replica serves at most 40 requests a
second. Load goes from 10/s to 50/s (5x) and back, open loop, through the real
gateway, sidecars (mTLS), Consul and control plane. Expected: replicas of
classifier:v1 go up within a stated time and p99 comes back under the target;
after the load, replicas go back to min_replicas with no request failing while
they leave. The figures go to test-artifacts/autoscale.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from controlplane import processes
from controlplane.config import PROJECT_ROOT
from tests.test_observability import ARTIFACTS

pytestmark = pytest.mark.slow
NLP = PROJECT_ROOT / "examples" / "nlp"
LOW, HIGH = 10, 50  # requests a second: one replica serves 40
P99_TARGET_MS = 250  # under the high load, once scaled
UP_WITHIN_S = 30  # from the step to a second replica passing
TEXTS = ["the striker scored a brilliant goal", "the new phone has a fast chip", "the pasta was delicious"]


def stack_file(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    stack = yaml.safe_load((NLP / "stack.yaml").read_text())
    stack["runtimes"] = [r for r in stack["runtimes"] if r["version"] == "v1"]
    for runtime in stack["runtimes"]:
        if runtime["model"] == "classifier":
            runtime["target"] = "tests.scaling_models:classify_on_device"
            runtime["autoscale"] = {
                "min_replicas": 1, "max_replicas": 4, "target_in_flight": 1, "up_window": 2, "down_window": 15,
            }  # fmt: skip
    stack["kafka"] = False
    names = ("consul", "xds", "admin", "gateway", "gateway_admin", "controlplane_metrics")
    ports = {k: processes.free_port() for k in names}
    stack["ports"] = ports
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(stack))
    return path, ports


async def load(url: str, rate: float, seconds: float, out: list[tuple[float, float, int]]) -> None:
    """Open loop: request i leaves at start + i/rate whatever the others do; (sent, latency, status) each."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one(i: int, due: float) -> None:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
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


def scaling(ports: dict[str, int]) -> dict[str, Any]:
    status, body = processes.http_get(f"http://127.0.0.1:{ports['controlplane_metrics']}/api/status", timeout=5)
    assert status == 200
    return next(r for r in json.loads(body)["scaling"] if r["model"] == "classifier")


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
            stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT, env=env, start_new_session=True,
        )  # fmt: skip


async def test_a_load_step_scales_the_loaded_version_up_and_back_down_without_a_failure(tmp_path: Path) -> None:
    path, ports = stack_file(tmp_path)
    up = launch(path, tmp_path)
    url = f"http://127.0.0.1:{ports['gateway']}/pipelines/nlp"
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops everything" not in (tmp_path / "up.log").read_text():
            assert up.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
            await asyncio.sleep(0.5)
        assert scaling(ports)["wanted"] == 1 and scaling(ports)["passing"] == 1

        seen: list[tuple[float, int, int]] = []
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(ports, seen, stop))
        low: list[tuple[float, float, int]] = []
        await load(url, LOW, 10, low)
        step = time.monotonic()
        high: list[tuple[float, float, int]] = []
        await load(url, HIGH, 45, high)
        after = time.monotonic()
        settle: list[tuple[float, float, int]] = []
        await load(url, LOW, 40, settle)
        stop.set()
        await watcher

        decided_up = first(seen, step, lambda wanted, passing: wanted >= 2)
        second_passing = first(seen, step, lambda wanted, passing: passing >= 2)
        peak = max(passing for at, _, passing in seen if step <= at <= after)
        back_to_min = first(seen, after, lambda wanted, passing: wanted == 1 and passing == 1)
        scaled_p99 = p99([r for r in high if r[0] >= step + 30])  # the last 15 s of the high load
        failed = {"low": sum(s != 200 for *_, s in low), "high": sum(s != 200 for *_, s in high),
                  "after": sum(s != 200 for *_, s in settle)}  # fmt: skip
        figures = {
            "load_rps": {"low": LOW, "high": HIGH}, "device_ms": 25,
            "decided_up_after_s": decided_up, "second_replica_passing_after_s": second_passing,
            "peak_replicas_passing": peak, "p99_ms": {"low": p99(low), "high_first_10s": p99(
                [r for r in high if r[0] < step + 10]), "high_last_15s": scaled_p99, "after": p99(settle)},
            "back_to_min_after_load_s": back_to_min, "failed": failed, "requests": len(low) + len(high) + len(settle),
            "last_decision": scaling(ports)["reason"],
        }  # fmt: skip
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "autoscale.json").write_text(json.dumps(figures, indent=2))
        print(json.dumps(figures, indent=2))

        assert decided_up is not None and second_passing is not None and second_passing <= UP_WITHIN_S, figures
        assert peak >= 2, figures
        assert scaled_p99 <= P99_TARGET_MS, figures
        assert back_to_min is not None, figures  # down to min_replicas during the 40 s of low load
        assert failed == {"low": 0, "high": 0, "after": 0}, figures  # scale-in lost nothing
        assert "autoscale classifier:v1: 1 -> " in (tmp_path / "up.log").read_text()

        # A record that does not parse (a hand edit, another tool) changes nothing and stops nothing.
        key = f"http://127.0.0.1:{ports['consul']}/v1/kv/mllambda/pipelines-autoscale/classifier.v1"
        async with aiohttp.ClientSession() as session, session.put(key, data=b'{"replicas": "lots"\n') as resp:
            assert (await resp.read()).strip() == b"true"
        await asyncio.sleep(3)
        assert "autoscale record for classifier.v1 is not readable" in (tmp_path / "up.log").read_text()
        assert up.poll() is None and scaling(ports)["passing"] == 1
        after_garbage: list[tuple[float, float, int]] = []
        await load(url, LOW, 3, after_garbage)
        assert all(status == 200 for *_, status in after_garbage)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGINT)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
