"""Autoscaling decisions, policies and records: pure code, no processes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from controlplane.delivery.traffic import merge, parse_envoy_stats
from controlplane.errors import CliError
from controlplane.scaling.policy import (
    MAX_POLICIES,
    InvalidPolicy,
    Observation,
    Policy,
    Stabilizer,
    load_policies,
    parse_policy,
    policies_document,
    recommend,
)
from controlplane.scaling.scaler import MAX_RECORD, demand_factor, parse_record
from controlplane.stack.file import load_stack
from tests.helpers.envoy import wait_for

POLICY = Policy("classifier", "v1", min_replicas=1, max_replicas=4, target_in_flight=2, up_window=3, down_window=10)


def run(stabilizer: Stabilizer, current: int, loads: list[float], start: float = 0.0) -> list[tuple[float, int, str]]:
    """Feed one observation a second; apply each decision; return (time, replicas, reason) of every change."""
    changes = []
    for i, load in enumerate(loads):
        decision = stabilizer.decide(start + i, current, Observation(load, current))
        if decision is not None:
            current = decision.replicas
            changes.append((start + i, current, decision.reason))
    return changes


def test_load_asks_for_replicas_by_in_flight_per_replica_within_bounds() -> None:
    assert recommend(POLICY, Observation(0, 1))[0] == 1  # never below min
    assert recommend(POLICY, Observation(4, 1))[0] == 2
    assert recommend(POLICY, Observation(4.1, 1))[0] == 3
    assert recommend(POLICY, Observation(500, 1))[0] == 4  # never above max
    slow = Policy("m", "v1", 1, 6, target_in_flight=100, target_p99_ms=200)
    wanted, reason = recommend(slow, Observation(5, 2, p99_ms=450))
    assert wanted == 5 and "p99 450 ms over the target 200 ms" in reason


def test_a_spike_shorter_than_the_up_window_adds_nothing_a_lasting_one_does() -> None:
    assert run(Stabilizer(POLICY, 0), 1, [0, 9, 0, 9, 0, 0]) == []
    changes = run(Stabilizer(POLICY, 0), 1, [0, 8, 8, 8, 8, 8])
    assert changes[0][:2] == (4, 4)  # the 4th second of 8 in flight (3 s window): 4 replicas
    assert "up 1→4" in changes[0][2] and "8 in flight" in changes[0][2]


def test_replicas_leave_only_after_the_load_stayed_low_for_the_whole_down_window() -> None:
    stabilizer = Stabilizer(POLICY, 0)
    changes = run(stabilizer, 1, [8] * 5 + [1] * 20)
    ups = [c for c in changes if "up" in c[2]]
    downs = [c for c in changes if "down" in c[2]]
    assert ups[0][1] == 4
    assert len(downs) == 1 and downs[0][1] == 1
    assert downs[0][0] >= 4 + 10  # the last high recommendation (t=4) plus the window
    assert "over 10 s" in downs[0][2]


def test_nothing_leaves_before_a_new_decider_has_watched_a_whole_window() -> None:
    stabilizer = Stabilizer(POLICY, started=100)
    assert run(stabilizer, 3, [0] * 9, start=100) == []  # 9 s < 10 s window
    assert run(stabilizer, 3, [0] * 3, start=109)[0][1] == 1


def test_to_zero_only_after_a_window_without_requests_and_back_at_the_first_one() -> None:
    idle = Policy("m", "v1", min_replicas=0, max_replicas=2, target_in_flight=4, up_window=30, down_window=5)
    stabilizer = Stabilizer(idle, 0)
    seen = [Observation(0, 1, active=i % 3 == 0) for i in range(10)]  # short requests, never seen in flight
    assert [stabilizer.decide(i, 1, o) for i, o in enumerate(seen)] == [None] * 10
    quiet = [stabilizer.decide(10 + i, 1, Observation(0, 1)) for i in range(6)]
    assert [d.replicas for d in quiet if d] == [0] and "down 1→0" in next(d for d in quiet if d).reason  # type: ignore[union-attr]
    cold = stabilizer.decide(17, 0, Observation(1, 0))  # one request held: no 30 s up window to wait out
    assert cold is not None and cold.replicas == 1 and "cold start" in cold.reason


def test_a_count_outside_the_bounds_is_brought_back() -> None:
    decision = Stabilizer(POLICY, 0).decide(0, 9, Observation(0, 9))
    assert decision is not None and decision.replicas == 4 and "outside 1..4" in decision.reason


def test_recommendations_kept_are_bounded_by_the_window() -> None:
    stabilizer = Stabilizer(Policy("m", "v1", up_window=3, down_window=20), 0)
    run(stabilizer, 1, [1.0] * 1000)
    assert len(stabilizer._seen) <= 22


def test_policies_name_every_problem_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidPolicy) as err:
        parse_policy(
            {
                "model": "Bad\nName",
                "version": "v1",
                "min_replicas": -1,
                "max_replicas": 1000,
                "target_in_flight": -1,
                "up_window": "soon",
                "surprise": 1,
            },
            "models[0].",
        )
    text = "\n".join(err.value.problems)
    for path in ("models[0].model", "min_replicas", "max_replicas", "target_in_flight", "up_window", "surprise"):
        assert path in text
    with pytest.raises(InvalidPolicy, match="below min_replicas"):
        parse_policy({"model": "m", "version": "v1", "min_replicas": 3, "max_replicas": 2})
    doc = policies_document((POLICY, Policy("m", "v2")))
    path = tmp_path / "autoscale.yaml"
    path.write_text(json.dumps(doc))
    assert load_policies(path) == (POLICY, Policy("m", "v2"))
    path.write_text(json.dumps({"kind": "Autoscale", "models": [doc["models"][0]] * 2}))
    with pytest.raises(InvalidPolicy, match=r"classifier\.v1: more than one policy"):
        load_policies(path)
    path.write_text(json.dumps({"kind": "Autoscale", "models": [doc["models"][0]] * (MAX_POLICIES + 1)}))
    with pytest.raises(InvalidPolicy, match=f"at most {MAX_POLICIES}"):
        load_policies(path)
    path.write_text("kind: [")
    with pytest.raises(InvalidPolicy, match="not valid YAML"):
        load_policies(path)


def test_the_stack_file_takes_a_policy_per_runtime_and_starts_at_min(tmp_path: Path) -> None:
    path = tmp_path / "stack.yaml"
    runtime = {"model": "m", "version": "v1", "target": "x:y", "autoscale": {"min_replicas": 2, "max_replicas": 3}}
    path.write_text(json.dumps({"kind": "Stack", "runtimes": [runtime]}))
    spec = load_stack(path).runtimes[0]
    assert spec.replicas == 2 and spec.autoscale == Policy("m", "v1", min_replicas=2, max_replicas=3)
    # admission follows the policy's target in flight (4 by default), unless the runtime's own flags set it
    assert spec.runtime_args() == ("--max-in-flight=8", "--queue=1024", "--queue-wait=30")
    own = dataclasses.replace(spec, args=("--max-in-flight=1", "--inline=never"))
    assert own.runtime_args() == ("--max-in-flight=1", "--inline=never")
    assert dataclasses.replace(spec, autoscale=None).runtime_args() == ()
    runtime["replicas"] = 5
    runtime["autoscale"] = {"model": "other", "max_replicas": 0}
    path.write_text(json.dumps({"kind": "Stack", "runtimes": [runtime]}))
    with pytest.raises(CliError) as err:
        load_stack(path)
    assert "runtimes[0].autoscale.model: not here" in str(err.value)
    assert "runtimes[0].autoscale.max_replicas: expected a whole number from 1 to 100" in str(err.value)


def test_a_scale_record_that_is_not_ours_is_ignored() -> None:
    good = {"model": "m", "version": "v1", "replicas": 3, "reason": "r", "at": 1.0, "by": "cp"}
    assert parse_record(json.dumps(good).encode()).replicas == 3  # type: ignore[union-attr]
    hostile = [
        None,
        b"",
        b"not json",
        b"[]",
        b"{}",
        json.dumps({**good, "replicas": -1}).encode(),
        json.dumps({**good, "replicas": 10**9}).encode(),
        json.dumps({**good, "replicas": "3"}).encode(),
        json.dumps({**good, "at": "yesterday"}).encode(),
        json.dumps({**good, "reason": "x" * MAX_RECORD}).encode(),
        b"\xff\xfe",
        json.dumps({**good, "at": 1e300}).encode(),
        json.dumps({**good, "at": float("nan")}).encode(),
    ]
    assert [parse_record(raw) for raw in hostile] == [None] * len(hostile)


def test_in_flight_is_read_from_envoy_gauges_and_summed_over_envoys() -> None:
    def stats(active: int, pending: int) -> dict[str, object]:
        return {
            "stats": [
                {"name": "cluster.classifier_v1.upstream_rq_total", "value": 10},
                {"name": "cluster.classifier_v1.upstream_rq_active", "value": active},
                {"name": "cluster.classifier_v1.upstream_rq_pending_active", "value": pending},
            ]
        }

    merged = merge([parse_envoy_stats(stats(3, 1)), parse_envoy_stats(stats(2, 0))])
    assert merged["classifier.v1"].in_flight == 6 and merged["classifier.v1"].requests == 20


def test_refused_requests_count_as_demand_so_shedding_and_scaling_work_together() -> None:
    def stats(total: int, refused_429: int, refused_503: int) -> dict[str, object]:
        return {
            "stats": [
                {"name": "cluster.classifier_v1.upstream_rq_total", "value": total},
                {"name": "cluster.classifier_v1.upstream_rq_active", "value": 4},
                {"name": "cluster.classifier_v1.upstream_rq_429", "value": refused_429},
                {"name": "cluster.classifier_v1.upstream_rq_503", "value": refused_503},
            ]
        }

    merged = merge([parse_envoy_stats(stats(100, 30, 10)), parse_envoy_stats(stats(100, 0, 20))])
    assert merged["classifier.v1"].refused == 60 and merged["classifier.v1"].in_flight == 8
    assert demand_factor(asked=200, refused=100) == 2.0  # half refused: twice what is in flight is wanted
    assert demand_factor(asked=200, refused=0) == demand_factor(0, 0) == 1.0
    assert demand_factor(asked=100, refused=100) == 10.0  # all refused: bounded
    wanted, reason = recommend(POLICY, Observation(4 * demand_factor(200, 100), 2, refusing=True))
    assert wanted == 4 and "8 in flight and refused, target 2 per replica" in reason  # 4 in flight alone: 2


class Recorded:
    """A scaler backend that keeps what it was asked (the local backend's job is done by the record itself)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def scale(self, policy: Policy, replicas: int) -> None:
        self.calls.append((policy.cluster, replicas))


async def test_one_control_plane_decides_and_the_next_continues_from_its_record(consul_agent: Any) -> None:
    """Two autoscalers on a real Consul: one holds the lock and decides; when it goes, the other takes over
    from the recorded replicas (no reset to what passes), and its own decisions follow."""
    import consul.aio

    from contract.service import RuntimeService
    from controlplane.delivery.traffic import ClusterStats
    from controlplane.scaling.scaler import Autoscaler, record_key

    prefix = f"test-{uuid.uuid4().hex[:8]}/"
    policy = Policy("classifier", "v1", 1, 4, target_in_flight=1, up_window=0.5, down_window=2)
    load = {"in_flight": 0}
    passing = [RuntimeService("c-0", "classifier", "v1", "127.0.0.1", 1, "", 2, 3, "", passing=True)]

    async def stats() -> dict[str, ClusterStats]:
        return {policy.cluster: ClusterStats(in_flight=load["in_flight"])}

    client = consul.aio.Consul(host="127.0.0.1", port=consul_agent.http_port)
    scalers = {
        name: Autoscaler(client, prefix, [policy], lambda: passing, stats, f"cp-{name}", Recorded()) for name in "ab"
    }
    tasks = {name: asyncio.create_task(scaler.run()) for name, scaler in scalers.items()}

    async def record() -> dict[str, Any]:
        _, item = await client.kv.get(record_key(prefix, policy))
        return json.loads(item["Value"]) if item else {}

    async def until(test: Any, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not test():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)

    try:
        await until(lambda: any(s.lock.holding for s in scalers.values()))
        holder = next(n for n, s in scalers.items() if s.lock.holding)
        other = "b" if holder == "a" else "a"
        load["in_flight"] = 5
        await until(lambda: scalers[holder].wanted.get(policy.cluster) == 4)
        assert (await record())["replicas"] == 4 and (await record())["by"] == f"cp-{holder}"
        assert scalers[holder].backend.calls[-1] == (policy.cluster, 4)  # type: ignore[attr-defined]
        assert scalers[other].backend.calls == [] and not scalers[other].lock.holding  # type: ignore[attr-defined]

        tasks[holder].cancel()  # the deciding control plane goes away (its session is destroyed)
        await asyncio.gather(tasks[holder], return_exceptions=True)
        await until(lambda: scalers[other].lock.holding)
        await asyncio.sleep(1.5)  # an observation window: a reset to 1 passing would show within it
        assert scalers[other].wanted[policy.cluster] == 4  # continued from the record, not reset to 1 passing
        assert (await record())["by"] == f"cp-{holder}"  # nothing to decide while the load stays
        load["in_flight"] = 0
        await until(lambda: scalers[other].wanted.get(policy.cluster) == 1)
        assert (await record())["by"] == f"cp-{other}" and "down 4→1" in (await record())["reason"]
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        await client.kv.delete(prefix.rstrip("/") + "-autoscale/", recurse=True)
        await client.close()


def test_the_control_plane_refuses_a_bad_policy_file_and_scale_to_zero_beyond_one_host(tmp_path: Path) -> None:
    import subprocess
    import sys

    from controlplane.config import PROJECT_ROOT

    def start(*flags: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "controlplane.cli", "controlplane", "--consul=127.0.0.1:1", *flags]
        return subprocess.run(argv, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)

    path = tmp_path / "autoscale.yaml"
    path.write_text(json.dumps(policies_document((Policy("m", "v1", min_replicas=0),))))
    refused = start(f"--autoscale={path}", "--scaler=kubernetes")
    assert refused.returncode == 1 and "min_replicas 0 works with --scaler local only" in refused.stderr
    path.write_text("kind: Autoscale\nmodels: [{model: m, version: v1, max_replicas: 0}]\n")
    refused = start(f"--autoscale={path}")
    assert refused.returncode == 1 and "models[0].max_replicas" in refused.stderr and "Traceback" not in refused.stderr


async def test_the_activator_holds_requests_until_a_replica_passes_and_refuses_beyond_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import aiohttp

    from contract import headers as h
    from controlplane.scaling import activator as module
    from controlplane.scaling.activator import Activator

    monkeypatch.setattr(module, "MAX_HELD", 2)
    monkeypatch.setattr(module, "SETTLE", 0.05)
    passing: dict[str, int] = {}
    held = Activator([Policy("idle", "v1", min_replicas=0), Policy("busy", "v1")], lambda: passing)
    await held.start()
    try:
        assert list(held.ports) == ["idle.v1"]  # only versions that may go to zero get a port
        assert held.parked() == (("idle.v1", "127.0.0.1", held.ports["idle.v1"]),)
        url = f"http://127.0.0.1:{held.ports['idle.v1']}/pipelines/p/v1/stage"
        async with aiohttp.ClientSession() as session:

            async def call() -> tuple[int, str | None]:
                async with session.post(url, data=b'{"x": 1}') as resp:
                    return resp.status, resp.headers.get(h.RETRIABLE)

            waiting = [asyncio.create_task(call()) for _ in range(2)]
            await wait_for(lambda: held.held.get("idle.v1") == 2, 5)  # both arrived (late on a busy machine)
            await asyncio.sleep(0.3)  # simulated cold start: no replica passes for 0.3 s after they arrived
            assert held.held["idle.v1"] == 2 and not any(t.done() for t in waiting)  # held, not failed
            assert await call() == (503, None)  # a third is refused at once: the bound
            passing["idle.v1"] = 1
            assert await asyncio.gather(*waiting) == [(503, "1"), (503, "1")]  # "retry the hop": it reaches the replica
        assert held.parked() == () and held.held["idle.v1"] == 0
        assert 0.3 <= held.cold_starts["idle.v1"] < 2
    finally:
        await held.stop()
