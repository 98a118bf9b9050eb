"""Pipelines through real Envoys: gateway -> sidecars -> runtimes, configured only by the control plane."""

from __future__ import annotations

import asyncio
import collections
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.common import runtime_codes
from controlplane.node.processes import http_get
from tests.helpers.components import passing
from tests.helpers.envoy import envoy_stat, near_share, wait_for
from tests.helpers.pipelines import (
    M,
    apply,
    in_traffic,
    pipeline,
    post,
    runtime_requests,
    service_meta,
    switch_under_load,
    until_ok,
)

pytestmark = pytest.mark.slow


async def test_three_stage_pipeline_returns_the_composed_result(
    control_plane: Any, gateway: Any, three_stages: list[Any], tmp_path: Path
) -> None:
    apply(control_plane, tmp_path, pipeline("words"))
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/words"
    status, body, served = await until_ok(url, {"text": "the quick brown fox"})
    assert (status, body) == (200, {"count": 4, "score": 40})
    assert served == "tokenize=tokenize:v1, count=count:v1, score=score:v1"

    async with aiohttp.ClientSession() as session:
        status, body, _ = await post(session, url, {"no_text": 1})
        assert status == 422 and "expected {'text'" in body["error"]
        status, body, _ = await post(session, f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/nope", {})
        assert status == 404 and "mllambda get pipelines" in body["error"]

        # The same pipeline as an Open Inference Protocol model; malformed requests get OIP's 400s.
        infer = f"http://127.0.0.1:{control_plane.gateway_port}/v2/models/words/infer"
        text = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["the quick brown fox"]}
        status, body, _ = await post(session, infer, {"id": "r1", "inputs": [text]})
        assert status == 200, body
        assert body["id"] == "r1" and body["model_name"] == "words"
        assert {t["name"]: t["data"] for t in body["outputs"]} == {"count": [4], "score": [40]}
        status, body, _ = await post(session, infer, {"inputs": [{**text, "shape": [2]}]})
        assert (status, body) == (400, {"error": "inputs[0]: shape [2] holds 2 elements, data has 1"})
        # Only the gateway's OIP route makes a request OIP: the header from a client is dropped.
        async with session.post(url, json={"text": "a b"}, headers={"x-mll-protocol": "oip"}) as resp:
            assert (resp.status, await resp.json()) == (200, {"count": 2, "score": 20})


async def test_weights_split_traffic_and_change_live(
    control_plane: Any, gateway: Any, three_stages: list[Any], start_runtime: Any, tmp_path: Path
) -> None:
    start_runtime(f"{M}:score_v2", "score", "v2")
    split = {
        "variants": [
            {"model": "score", "version": "v1", "weight": 90},
            {"model": "score", "version": "v2", "weight": 10},
        ]
    }
    apply(control_plane, tmp_path, pipeline("split", **split))
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/split"
    await until_ok(url, {"text": "a b"})

    async def share(n: int) -> tuple[float, int]:
        seen: collections.Counter[str] = collections.Counter()
        failed = 0
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as session:

            async def one() -> None:
                nonlocal failed
                status, body, _ = await post(session, url, {"text": "a b"})
                if status != 200:
                    failed += 1
                else:
                    seen["v2" if body["score"] == 200 else "v1"] += 1

            for chunk in range(0, n, 50):
                await asyncio.gather(*(one() for _ in range(min(50, n - chunk))))
        return seen["v2"] / max(1, sum(seen.values())), failed

    v2_share, failed = await share(2000)
    assert failed == 0
    assert near_share(v2_share * 2000, 2000, 0.10), v2_share

    split["variants"][0]["weight"] = split["variants"][1]["weight"] = 50  # type: ignore[index]
    apply(control_plane, tmp_path, pipeline("split", **split))
    await in_traffic(control_plane, "split", 2)
    v2_share, failed = await share(1000)
    assert failed == 0
    assert near_share(v2_share * 1000, 1000, 0.50), v2_share


async def test_shadow_gets_copies_and_never_affects_the_answer(
    control_plane: Any,
    consul_agent: Any,
    gateway: Any,
    three_stages: list[Any],
    start_runtime: Any,
    tmp_path: Path,
) -> None:
    shadow = start_runtime(f"{M}:score_v2", "score", "v2")
    spec = {
        "variants": [{"model": "score", "version": "v1"}],
        "shadow": {"model": "score", "version": "v2", "percent": 30},
    }
    apply(control_plane, tmp_path, pipeline("shadowed", **spec))
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/shadowed"
    await until_ok(url, {"text": "a b"})
    count = three_stages[1]  # the stage whose sidecar sends the copies

    def answered() -> tuple[int, int]:
        port = consul_agent.http_port
        copies = runtime_codes(port, "score", shadow.service_id).get("200", 0)  # answered: none cut off (499)
        return copies, runtime_requests(port, "count", count.service_id)

    before = answered()
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(post(session, url, {"text": "a b"}) for _ in range(600)))
    assert {(status, body["score"]) for status, body, _ in results} == {(200, 20)}  # never v2's 200
    await asyncio.sleep(0.5)  # an observation window: copies land after the answers (nothing says when)
    copies, counted = (after - then for after, then in zip(answered(), before, strict=True))
    assert 0.24 <= copies / 600 <= 0.36, f"{copies} copies; the count stage ran {counted} times for 600 requests"

    broken = start_runtime(f"{M}:broken", "broken", "v1")
    spec["shadow"] = {"model": "broken", "version": "v1", "percent": 100}
    apply(control_plane, tmp_path, pipeline("shadowed", **spec))
    await in_traffic(control_plane, "shadowed", 2)
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(post(session, url, {"text": "a b"}) for _ in range(100)))
    assert {status for status, _, _ in results} == {200}
    await wait_for(lambda: runtime_requests(consul_agent.http_port, "broken", broken.service_id) >= 90, 10)


async def test_branch_follows_the_key_the_previous_stage_produced(
    control_plane: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    targets = [("tokenize", "tokenize"), ("count", "count"), ("length_class", "classify")]
    targets += [("short_model", "short"), ("long_model", "long")]
    passing(*(start_runtime(f"{M}:{target}", model, "v1", wait=False) for target, model in targets))
    spec = {
        "name": "branchy",
        "stages": [
            {"name": "tokenize", "variants": [{"model": "tokenize", "version": "v1"}]},
            {"name": "count", "variants": [{"model": "count", "version": "v1"}]},
            {"name": "classify", "variants": [{"model": "classify", "version": "v1"}]},
            {
                "name": "answer",
                "branch_on": "category",
                "branches": [
                    {"key": "short", "variants": [{"model": "short", "version": "v1"}]},
                    {"key": "long", "variants": [{"model": "long", "version": "v1"}]},
                ],
            },
        ],
    }
    apply(control_plane, tmp_path, spec)
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/branchy"
    _, body, served = await until_ok(url, {"text": "two words"})
    assert body == {"category": "short", "answer": "short text"}
    assert served.endswith("answer=short:v1")
    _, body, served = await until_ok(url, {"text": "this one has many words"})
    assert body == {"category": "long", "answer": "long text"}
    assert served.endswith("answer=long:v1")


async def test_switching_transport_live_fails_no_request(
    control_plane: Any, gateway: Any, three_stages: list[Any], tmp_path: Path
) -> None:
    outcomes = await switch_under_load(control_plane, tmp_path, "switchy", ["uds", "http", "uds", "http"], 0.7)
    assert set(outcomes) == {200}, outcomes
    assert outcomes[200] > 100


async def test_a_stage_whose_model_is_down_answers_503_naming_the_stage(
    control_plane: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    *_, scorer = passing(*(start_runtime(f"{M}:{m}", m, "v1", wait=False) for m in ("tokenize", "count", "score")))
    apply(control_plane, tmp_path, pipeline("fragile"))
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/fragile"
    await until_ok(url, {"text": "a b"})

    scorer.proc.stop()
    async with aiohttp.ClientSession() as session:

        async def down() -> Any:
            status, body, _ = await post(session, url, {"text": "a b"})
            return body if status == 503 else None

        body = await wait_for(down, timeout=15)
    assert body["route"] == "fragile/score", body
    assert "no healthy upstream" in body["error"]

    start_runtime(f"{M}:score", "score", "v1")
    _, body, _ = await until_ok(url, {"text": "a b"})
    assert body == {"count": 2, "score": 20}


async def test_a_failure_further_down_is_not_retried_by_every_hop(
    control_plane: Any, consul_agent: Any, gateway: Any, three_stages: list[Any], tmp_path: Path
) -> None:
    """Each hop retries its own next hop; an answer relayed from further down is final (no retry storm)."""
    apply(control_plane, tmp_path, pipeline("storm", variants=[{"model": "missing", "version": "v1"}]))
    await in_traffic(control_plane, "storm", 1)  # apply returns before the gateway enters the version
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/storm"
    counted = [runtime_requests(consul_agent.http_port, r.model, r.service_id) for r in three_stages]
    async with aiohttp.ClientSession() as session:
        results = [await post(session, url, {"text": "a b"}) for _ in range(10)]
    assert {status for status, _, _ in results} == {503}
    assert results[0][1]["route"] == "storm/score", results[0][1]
    after = [runtime_requests(consul_agent.http_port, r.model, r.service_id) for r in three_stages]
    # Two retries per hop would make that 30 calls of tokenize and 90 of count.
    assert [a - b for a, b in zip(after, counted, strict=True)] == [10, 10, 0]
    assert envoy_stat(gateway, "cluster.tokenize_v1.upstream_rq_retry") == 0


async def test_a_runtime_its_sidecar_cannot_reach_is_retried_on_another_replica(
    control_plane: Any, consul_agent: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    # Through the sidecars (`--colocated ingress`): on one host the gateway reaches a runtime at its socket, and
    # its pooled connections there outlive the path unlinked below (a killed runtime: tests/test_colocated_e2e.py).
    control_plane.stop()
    control_plane.env = {**control_plane.env, "MLLAMBDA_COLOCATED": "ingress"}
    control_plane.start()
    lost = start_runtime(f"{M}:tokenize", "tokenize", "v1")
    start_runtime(f"{M}:tokenize", "tokenize", "v1")
    spec = {"name": "lone", "stages": [{"name": "t", "variants": [{"model": "tokenize", "version": "v1"}]}]}
    apply(control_plane, tmp_path, spec)
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/lone"
    await until_ok(url, {"text": "a b"})
    await wait_for(lambda: envoy_stat(gateway, "cluster.tokenize_v1.membership_healthy") == 2)

    # One runtime's Unix socket is gone (as after a crash); its health check (TCP) still passes. Over
    # uds its sidecar cannot reach it and answers a 503 of its own: the gateway retries the other one.
    os.unlink(service_meta(consul_agent.http_port, "tokenize", lost.service_id)["runtime_uds"])
    apply(control_plane, tmp_path, {**spec, "transport": "uds"})
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            status, answer, _ = await post(session, url, {"text": "a b"})
            assert status == 200, answer
            if envoy_stat(gateway, "cluster.tokenize_v1.upstream_rq_retry"):
                break
            await asyncio.sleep(0.05)
    assert envoy_stat(gateway, "cluster.tokenize_v1.upstream_rq_retry") > 0, "the lost replica was never tried"
    # ... and operators see it: the control plane's metrics count retries per variant.
    _, metrics = http_get(f"http://127.0.0.1:{control_plane.metrics_port}/metrics")
    retries = [line for line in metrics.splitlines() if line.startswith("mllambda_variant_retries_total{")]
    assert any('model="tokenize"' in line and not line.endswith(" 0.0") for line in retries), retries


async def test_payload_logging_samples_at_its_rate_and_stops_when_turned_off(
    control_plane: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    logs = tmp_path / "payloads"
    passing(
        start_runtime(f"{M}:tokenize", "tokenize", "v1", wait=False, extra=(f"--payload-log-dir={logs}",)),
        *(start_runtime(f"{M}:{m}", m, "v1", wait=False) for m in ("count", "score")),
    )
    apply(control_plane, tmp_path, {**pipeline("logged"), "logging": {"percent": 10}})
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/logged"
    await until_ok(url, {"text": "warm up"})

    async def send(n: int) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as session:
            for _ in range(n // 50):
                results = await asyncio.gather(*(post(session, url, {"text": f"a b {i}"}) for i in range(50)))
                assert all(status == 200 for status, _, _ in results)

    def records() -> list[dict[str, Any]]:
        path = logs / "logged.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    await send(2000)
    await asyncio.sleep(0.5)  # an observation window: the writer is behind the answers (nothing says when it is done)
    logged = [r for r in records() if r["request"] != {"text": "warm up"}]
    assert near_share(len(logged), 2000, 0.10), len(logged)
    first = logged[0]
    assert first["pipeline"] == "logged" and first["version"] == "1" and first["status"] == 200
    assert first["request"]["text"].startswith("a b ") and first["response"] == {"count": 3, "score": 30}
    assert first["served"] == ["tokenize=tokenize:v1", "count=count:v1", "score=score:v1"]
    assert first["latency_ms"] > 0 and len(first["request_id"]) >= 16  # the gateway's x-request-id

    apply(control_plane, tmp_path, pipeline("logged"))  # logging off
    await in_traffic(control_plane, "logged", 2)
    before = len(records())
    await send(300)
    await asyncio.sleep(0.5)  # an observation window: a record written late would show within it
    assert len(records()) == before


async def test_a_request_its_client_gave_up_on_goes_no_further(
    control_plane: Any, consul_agent: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    """The client hangs up while the first stage works: that stage stops, and the next one never runs."""
    slow = start_runtime(f"{M}:sleepy", "sleepy", "v1")  # 2 s per request
    after = start_runtime(f"{M}:echo", "echo", "v1")
    stages = [("slow", "sleepy"), ("after", "echo")]
    spec = {"name": "giveup", "stages": [{"name": s, "variants": [{"model": m, "version": "v1"}]} for s, m in stages]}
    apply(control_plane, tmp_path, spec)
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/giveup"
    _, body, served = await until_ok(url, {"n": 1}, timeout=30)
    assert body == {"slept": True} and served == "slow=sleepy:v1, after=echo:v1"
    assert runtime_requests(consul_agent.http_port, "echo", after.service_id) == 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as session:
        for _ in range(3):
            with pytest.raises(asyncio.TimeoutError):
                await post(session, url, {"n": 2})
    await asyncio.sleep(2.5)  # past the 2 s: a stage that ran on would have sent its output on by now
    assert runtime_requests(consul_agent.http_port, "echo", after.service_id) == 1
    by_code = runtime_codes(consul_agent.http_port, "sleepy", slow.service_id)
    assert by_code == {"200": 1, "499": 3}, by_code  # 499: the caller closed the request
