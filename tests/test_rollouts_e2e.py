"""Rollouts through real Envoys, Consul and runtimes under steady load: a good candidate is promoted
step by step, a failing one and a slow one are rolled back on their own, each with the reason."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.node import processes
from controlplane.node.sidecar import render_bootstrap
from tests.helpers.components import passing
from tests.helpers.envoy import wait_for
from tests.helpers.load import SteadyLoad, post_status
from tests.helpers.observe import metric, scrape
from tests.helpers.pipelines import until_ok
from tests.helpers.planes import second_control_plane

pytestmark = pytest.mark.slow
MODELS = "examples.trivial.models"
CANDIDATES = {"good": ("v2", "echo"), "failing": ("v3", "fails_30"), "slow": ("v4", "slow_echo")}


def spec(name: str, candidate: str, steps: list[int], step_seconds: int, ratio: float = 1.5) -> dict[str, Any]:
    rollout = {
        "candidate": {"model": "echo", "version": candidate},
        "steps": steps,
        "step_seconds": step_seconds,
        "min_requests": 30,
        "max_error_rate": 0.05,
        "max_p99_ratio": ratio,
    }
    stage = {"name": "s", "variants": [{"model": "echo", "version": "v1"}], "rollout": rollout}
    return {"kind": "Pipeline", "name": name, "stages": [stage]}


def call(port: int, name: str) -> int:
    return post_status(port, name)


def history(control_plane: Any, name: str) -> list[dict[str, Any]]:
    result = control_plane.cli("history", "pipeline", name, "-o", "json")
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    return list(found["items"] if isinstance(found, dict) else found)


def test_the_good_candidate_is_promoted_and_the_bad_ones_are_rolled_back_on_their_own(
    control_plane: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    passing(
        start_runtime(f"{MODELS}:echo", "echo", "v1", wait=False),
        *(start_runtime(f"{MODELS}:{target}", "echo", version, wait=False) for version, target in CANDIDATES.values()),
    )
    # Warm the baseline (its p99 is what the slow candidate is compared with).
    warm = [
        {"kind": "Pipeline", "name": n, "stages": [{"name": "s", "variants": [{"model": "echo", "version": "v1"}]}]}
        for n in CANDIDATES
    ]
    (tmp_path / "warm.yaml").write_text(yaml.safe_dump_all(warm))
    assert control_plane.cli("apply", "-f", str(tmp_path / "warm.yaml"), "--wait").returncode == 0
    results: dict[str, list[tuple[float, int]]] = {n: [] for n in CANDIDATES}
    stop = threading.Event()

    def load(name: str) -> None:
        while not stop.is_set():
            results[name].append((time.monotonic(), call(control_plane.gateway_port, name)))
            time.sleep(0.01)

    threads = [threading.Thread(target=load, args=(n,)) for n in CANDIDATES for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(6)  # baseline latency in the gateway's histograms (Envoy computes them every 5 s)
        specs = [
            # The same code: only the host's noise differs. Both p99s are over Envoy's last stats interval, so a
            # busy host slows both; since the Envoys started, the candidate's few dozen requests against the
            # baseline's thousands rolled it back twice on busy CI hosts (3.1x: 18 vs 6 ms; 7.6x: 24 vs 3 ms).
            # The slow candidate (+50 ms, ~9x) is judged at 1.5x below.
            spec("good", "v2", [20, 50, 100], 2, ratio=4.0),
            spec("failing", "v3", [20, 100], 8),
            spec("slow", "v4", [20, 100], 8),
        ]
        (tmp_path / "rollouts.yaml").write_text(yaml.safe_dump_all(specs))
        started = time.monotonic()
        applied = control_plane.cli("apply", "-f", str(tmp_path / "rollouts.yaml"))
        assert applied.returncode == 0, applied.stderr
        ended: dict[str, float] = {}
        deadline = time.monotonic() + 60
        while len(ended) < len(CANDIDATES) and time.monotonic() < deadline:
            for name in CANDIDATES:
                last = history(control_plane, name)[-1]["cause"]
                if name not in ended and ("promoted" in last or "auto-rollback" in last):
                    ended[name] = time.monotonic()
            time.sleep(0.5)
        time.sleep(2)  # load duration: the final version in traffic
        after = time.monotonic()
        time.sleep(2)  # load duration: answers after the end
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    causes = {n: [v["cause"] for v in history(control_plane, n)] for n in CANDIDATES}
    print(json.dumps(causes, indent=1))
    assert causes["good"][-4:] == [
        "rollout good/s echo:v2 step 1/3 (20%)",
        "rollout good/s echo:v2 step 2/3 (50%)",
        "rollout good/s echo:v2 step 3/3 (100%)",
        "rollout good/s echo:v2 promoted",
    ]
    assert causes["failing"][-2] == "rollout failing/s echo:v3 step 1/2 (20%)"
    assert causes["failing"][-1].startswith("auto-rollback failing/s echo:v3: 5xx"), causes["failing"]
    assert causes["slow"][-2] == "rollout slow/s echo:v4 step 1/2 (20%)"
    assert causes["slow"][-1].startswith("auto-rollback slow/s echo:v4: p99"), causes["slow"]

    # The good rollout failed nothing; the failing one cost at most its share of the window.
    assert [code for _, code in results["good"] if code != 200] == []
    failed = [t for t, code in results["failing"] if code != 200 and started <= t]
    during = [t for t, _ in results["failing"] if started <= t <= ended["failing"]]
    print(
        f"failing candidate: {len(failed)} of {len(during)} requests failed; rolled back after "
        f"{ended['failing'] - started:.1f} s"
    )
    assert len(failed) <= 0.20 * 0.30 * len(during) * 2 + 5, (len(failed), len(during))
    # Once rolled back, every request answers again.
    for name in ("failing", "slow"):
        assert all(code == 200 for t, code in results[name] if t >= after), name
    status = control_plane.cli("rollout", "status", "failing")
    assert "no rollout in progress" in status.stdout and "auto-rollback failing/s echo:v3: 5xx" in status.stdout


def driving(plane: Any) -> bool:
    try:
        _, body = processes.http_get(f"http://127.0.0.1:{plane.metrics_port}/api/status")
    except OSError:
        return False
    return bool(json.loads(body)["rollouts"]["driving"])


async def test_when_the_driving_control_plane_dies_the_other_continues_from_the_same_step(
    control_plane: Any, start_envoy: Any, start_runtime: Any, logs_dir: Path, tmp_path: Path
) -> None:
    second = second_control_plane(control_plane, logs_dir).start()
    both = f"{control_plane.xds_addr},{second.xds_addr}"
    try:
        start_envoy(
            lambda admin: render_bootstrap("gateway", "gateway", both, admin),
            admin_port=control_plane.gateway_admin_port,
        )
        start_runtime(f"{MODELS}:echo", "echo", "v1", xds=both)
        start_runtime(f"{MODELS}:echo", "echo", "v2", xds=both)
        planes = [control_plane, second]
        await wait_for(lambda: sum(driving(p) for p in planes) == 1, timeout=30)
        driver, other = planes if driving(control_plane) else planes[::-1]
        # v1 and v2 are the same code: what is judged here is the handover, not latency. With the default 1.5x
        # a busy machine once rolled it back (p99 20 vs 4 ms, the other test file loading both cores).
        handover = spec("handover", "v2", [10, 30, 50, 70, 100], 3, ratio=50.0)
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(handover))
        assert control_plane.cli("apply", "-f", str(tmp_path / "r.yaml")).returncode == 0
        url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/handover"
        await until_ok(url, {"text": "a b"})
        async with SteadyLoad(url) as load:
            # Step 2 written (and seen by the other through Consul): the kill comes mid-rollout. A history
            # polled by the CLI may show a later step already, and a busy machine may take a while.
            await wait_for(lambda: any("step 2/5" in v["cause"] for v in history(other, "handover")), timeout=60)
            shown = metric(scrape(other), "mllambda_rollout_candidate_percent", pipeline="handover", stage="s")
            assert shown in (30, 50, 70), shown  # the step /metrics shows: not promoted yet
            assert driver.proc is not None
            driver.proc.signal(signal.SIGKILL)  # no goodbye: its Consul session must time out
            killed = time.monotonic()
            await wait_for(lambda: driving(other), timeout=45)
            took_over = time.monotonic() - killed
            await wait_for(lambda: "promoted" in history(other, "handover")[-1]["cause"], timeout=60)
        causes = [v["cause"] for v in history(other, "handover")]
        print(f"took over after {took_over:.1f} s:", json.dumps(causes, indent=1))
        steps = [c for c in causes if "step" in c]
        assert steps == [
            f"rollout handover/s echo:v2 step {n}/5 ({p}%)" for n, p in enumerate([10, 30, 50, 70, 100], 1)
        ]
        assert causes[-1] == "rollout handover/s echo:v2 promoted"
        assert set(load.outcomes) == {200}, load.outcomes
    finally:
        second.stop()


async def test_a_version_an_envoy_rejects_is_rolled_back_to_the_one_every_envoy_took(
    control_plane: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    """The sidecar of `picky` cannot bind its ingress (someone holds the port): it NACKs every listener config."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    try:
        start_runtime(f"{MODELS}:echo", "echo", "v1")
        port = held.getsockname()[1]
        start_runtime(f"{MODELS}:echo", "picky", "v1", wait=False, extra=(f"--ingress-port={port}",))
        first = {"name": "a", "variants": [{"model": "echo", "version": "v1"}]}
        one = {"kind": "Pipeline", "name": "nacked", "stages": [first]}
        (tmp_path / "one.yaml").write_text(yaml.safe_dump(one))
        assert control_plane.cli("apply", "-f", str(tmp_path / "one.yaml"), "--wait").returncode == 0
        url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/nacked"
        two = {**one, "stages": [*one["stages"], {"name": "b", "variants": [{"model": "picky", "version": "v1"}]}]}
        (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
        async with SteadyLoad(url) as load:
            assert control_plane.cli("apply", "-f", str(tmp_path / "two.yaml")).returncode == 0
            await wait_for(lambda: "auto-rollback" in history(control_plane, "nacked")[-1]["cause"], timeout=30)
        last = history(control_plane, "nacked")[-1]
        print(last["cause"])
        assert last["cause"].startswith("auto-rollback nacked v2: picky-v1-")
        assert "rejected Listener" in last["cause"] and "ddress already in use" in last["cause"]
        assert [s["name"] for s in last["spec"]["stages"]] == ["a"]  # what every Envoy took
        assert set(load.outcomes) == {200}, load.outcomes  # version 1 served throughout
        # The rejection stays visible.
        _, body = processes.http_get(f"http://127.0.0.1:{control_plane.metrics_port}/api/status")
        nacks = [e["nack_error"] for e in json.loads(body)["envoys"] if e["node"].startswith("picky-v1-")]
        assert any("Address already in use" in n for n in nacks), nacks
    finally:
        held.close()
