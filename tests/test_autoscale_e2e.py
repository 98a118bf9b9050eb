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


def scaling(ports: dict[str, int], model: str = "classifier") -> dict[str, Any]:
    status, body = processes.http_get(f"http://127.0.0.1:{ports['controlplane_metrics']}/api/status", timeout=5)
    assert status == 200
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
            stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT, env=env, start_new_session=True,
        )  # fmt: skip


async def until_up(up: subprocess.Popen[bytes], tmp_path: Path) -> None:
    deadline = time.monotonic() + 240
    while "Ctrl-C stops everything" not in (tmp_path / "up.log").read_text():
        assert up.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
        await asyncio.sleep(0.5)


def stop_stack(up: subprocess.Popen[bytes]) -> None:
    if up.poll() is None:
        os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)


async def test_a_load_step_scales_the_loaded_version_up_and_back_down_without_a_failure(tmp_path: Path) -> None:
    path, ports = stack_file(tmp_path)
    up = launch(path, tmp_path)
    url = f"http://127.0.0.1:{ports['gateway']}/pipelines/nlp"
    try:
        await until_up(up, tmp_path)
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
        stop_stack(up)


IDLE = {"kind": "Stack", "name": "idle", "runtimes": [
    {"model": "tokenize", "version": "v1", "target": "examples.trivial.models:tokenize"},
    {"model": "count", "version": "v1", "target": "examples.trivial.models:count",
     "autoscale": {"min_replicas": 0, "max_replicas": 2, "target_in_flight": 4, "up_window": 2, "down_window": 6}},
    {"model": "score", "version": "v1", "target": "examples.trivial.models:score"},
], "pipelines": [{"name": "words", "stages": [
    {"name": "tokenize", "variants": [{"model": "tokenize", "version": "v1"}]},
    {"name": "count", "variants": [{"model": "count", "version": "v1"}], "timeout_ms": 30000},
    {"name": "score", "variants": [{"model": "score", "version": "v1"}]},
]}]}  # fmt: skip


async def test_a_version_scaled_to_zero_holds_the_first_request_until_a_replica_serves_it(tmp_path: Path) -> None:
    """count:v1 starts with no replica. The first request is held (not failed) while one starts; when
    no request came for the down window it goes back to zero; the next first request is served too.
    A pipeline naming the idle version can still be applied. Cold-start latencies are reported."""
    stack = {**IDLE, "ports": {k: processes.free_port() for k in ("consul", "xds", "admin", "gateway",
             "gateway_admin", "controlplane_metrics")}}  # fmt: skip
    ports = stack["ports"]
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump(stack))
    up = launch(path, tmp_path)
    url = f"http://127.0.0.1:{ports['gateway']}/pipelines/words"
    try:
        await until_up(up, tmp_path)
        assert "2/2 passing" in (tmp_path / "up.log").read_text()  # two runtimes start; count has none
        assert (scaling(ports, "count")["wanted"], scaling(ports, "count")["passing"]) == (0, 0)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=40)) as session:

            async def call() -> tuple[int, float, Any]:
                sent = time.monotonic()
                async with session.post(url, json={"text": "one two three"}) as resp:
                    return resp.status, time.monotonic() - sent, await resp.json(content_type=None)

            first = await call()
            assert first[0] == 200 and first[2] == {"count": 3, "score": 30}, first
            warm = [await call() for _ in range(20)]
            assert all(status == 200 for status, *_ in warm)
            cold_start = scaling(ports, "count")["cold_start_s"]
            deadline = time.monotonic() + 40
            while scaling(ports, "count")["passing"] != 0:  # idle for the down window: back to zero
                assert time.monotonic() < deadline, scaling(ports, "count")
                await asyncio.sleep(0.5)
            assert "autoscale count:v1: 1 -> 0 replicas" in (tmp_path / "up.log").read_text()
            stages = IDLE["pipelines"][0]["stages"]
            v2 = {"name": "words", "stages": [*stages[:2], {**stages[2], "timeout_ms": 4000}]}  # names count:v1
            server = f"--server=127.0.0.1:{ports['admin']}"
            argv = [sys.executable, "-m", "controlplane.cli", "apply", "-f", "-", server]
            applied = await asyncio.to_thread(
                subprocess.run, [*argv, "--wait"], input=yaml.safe_dump(v2), capture_output=True, text=True,
                cwd=PROJECT_ROOT, timeout=60,
            )  # fmt: skip
            assert applied.returncode == 0 and "created (version 2)" in applied.stdout, applied.stdout + applied.stderr
            second = await call()
            assert second[0] == 200 and second[2] == {"count": 3, "score": 30}, second
        warm_p50_ms = 1000 * sorted(t for _, t, _ in warm)[len(warm) // 2]
        figures = {"first_request_s": first[1], "cold_start_held_s": cold_start, "warm_p50_ms": warm_p50_ms,
                   "second_cold_request_s": second[1]}  # fmt: skip
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "scale-to-zero.json").write_text(json.dumps(figures, indent=2))
        print(json.dumps(figures, indent=2))
        assert first[1] > 0.5 and cold_start is not None, figures  # it was held while a replica started
    finally:
        stop_stack(up)
