"""The runtime's HTTP contract: bad payloads get a clear 4xx and never reach the model."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from runtime_sdk import Rejected
from runtime_sdk.admission import Admission
from runtime_sdk.app import INLINE_AFTER, INLINE_BUDGET, Placement, Runtime, serving
from tests.helpers.runtime import Client, served

calls: list[dict[str, Any]] = []


def model(payload: dict[str, Any]) -> dict[str, Any]:
    calls.append(payload)
    if payload.get("explode"):
        raise ValueError("kaboom")
    if payload.get("refuse"):
        raise Rejected("refused: need a positive number")
    if payload.get("weird"):
        return ["not", "a", "dict"]  # type: ignore[return-value]
    if payload.get("unserialisable"):
        return {"when": object()}
    return {"doubled": payload["n"] * 2}


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    calls.clear()
    runtime = Runtime(model, "doubler", "v1", ready=True)
    async with served(runtime, max_body=300_000) as test_client:
        yield test_client


async def test_predict_round_trip_names_who_served(client: Any) -> None:
    resp = await client.post("/predict", json={"n": 21})
    assert resp.status == 200
    assert await resp.json() == {"doubled": 42}
    assert resp.headers["x-mll-served"] == "direct=doubler:v1"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "body is not valid JSON"),
        (b"[1, 2]", 400, "body must be a JSON object, got list"),
        (b'"text"', 400, "body must be a JSON object, got str"),
        (b'{"pad": "' + b"x" * 300_000 + b'"}', 413, "body too large: the limit is 300000 bytes"),
        (b"[" * 50_000 + b"]" * 50_000, 400, "body is nested too deeply"),
    ],
)
async def test_bad_payloads_get_4xx_and_never_reach_the_model(
    client: Any, body: bytes, status: int, message: str
) -> None:
    resp = await client.post("/predict", data=body, headers={"content-type": "application/json"})
    assert resp.status == status
    assert message in (await resp.json())["error"]
    assert calls == []


async def test_model_errors_and_refusals_are_told_apart(client: Any, caplog: Any) -> None:
    refused = await client.post("/predict", json={"refuse": True})
    assert (refused.status, (await refused.json())["error"]) == (422, "refused: need a positive number")
    for flag, kind in (("explode", "ValueError"), ("weird", "TypeError"), ("unserialisable", "TypeError")):
        failed = await client.post("/predict", json={flag: True})
        answer = await failed.json()
        assert failed.status == 500 and set(answer) == {"error", "error_id"}, answer
        assert answer["error"] == f"model doubler:v1 failed ({kind}); see its log for error_id"
        # The detail stays in the runtime's log, under the id the caller got.
        logged = [r for r in caplog.records if answer["error_id"] in r.getMessage()]
        assert logged and logged[0].exc_info is not None
    assert "kaboom" not in str(answer) and "kaboom" in caplog.text


async def test_the_next_hop_can_only_be_a_stage_path_on_the_own_sidecar(client: Any) -> None:
    for hostile in ("@127.0.0.1:28999/stolen", "//evil.example/x", "/pipelines/p/v1/s/../../admin", "/readyz"):
        resp = await client.post("/predict", json={"n": 1}, headers={"x-mll-next": hostile})
        assert resp.status == 400, hostile
        assert (await resp.json())["error"] == "x-mll-next is not a stage path"


async def test_forged_ensemble_steering_is_refused_before_the_model_runs(client: Any) -> None:
    for fanout, path in [
        ("x=100\tevil", "/pipelines/p/v1/e"),
        ("x=100", "//evil.example/x"),
        ("a=1,a=2", "/pipelines/p/v1/e"),
    ]:
        resp = await client.post("/predict", json={"n": 1}, headers={"x-mll-fanout": fanout, "x-mll-fanout-path": path})
        assert resp.status == 400, fanout
        assert (await resp.json())["error"].startswith("x-mll-fanout: ")
    assert calls == []


async def test_readiness_and_metrics(client: Any) -> None:
    assert (await client.get("/readyz")).status == 200
    await client.post("/predict", json={"n": 1})
    await client.post("/predict", data=b"nope")
    too_large = await client.post("/predict", data=b"x" * 300_001, expect100=True)  # refused before predict
    assert too_large.status == 413 and "300000" in (await too_large.json())["error"]
    metrics = await (await client.get("/metrics")).text()
    assert 'mllambda_runtime_requests_total{code="200",model="doubler",version="v1"} 1.0' in metrics
    assert 'mllambda_runtime_requests_total{code="400",model="doubler",version="v1"} 1.0' in metrics
    assert 'mllambda_runtime_requests_total{code="413",model="doubler",version="v1"} 1.0' in metrics
    assert "mllambda_runtime_connections_refused_total 0.0" in metrics


async def test_quick_models_move_onto_the_event_loop_and_a_slow_call_moves_them_off() -> None:
    threads: list[int] = []

    def model(payload: dict[str, Any]) -> dict[str, Any]:
        threads.append(threading.get_ident())
        if payload.get("sleep"):  # not sleep(0): giving up the GIL can cost a busy machine's loop ms to get back
            time.sleep(payload["sleep"])  # simulated work
        return {}

    loop_thread = threading.get_ident()
    runtime = Runtime(model, "where", "v1", ready=True)
    async with served(runtime) as client:
        for _ in range(INLINE_AFTER + 5):
            assert (await client.post("/predict", json={})).status == 200
        assert loop_thread not in threads[:INLINE_AFTER], "measured in worker threads first"
        # Then inline. A call preempted past the budget on a busy machine starts the count again: allow a few.
        for _ in range(3 * INLINE_AFTER):
            if threads[-5:] == [loop_thread] * 5:
                break
            await client.post("/predict", json={})
        assert threads[-5:] == [loop_thread] * 5, "then inline: no thread hop"

        await client.post("/predict", json={"sleep": 2 * INLINE_BUDGET})  # inline, once
        await client.post("/predict", json={})
        assert threads[-2] == loop_thread and threads[-1] != loop_thread, "back to threads after a slow one"


@pytest.mark.parametrize(("mode", "on_loop"), [("always", True), ("never", False)])
async def test_placement_can_be_fixed(mode: str, on_loop: bool) -> None:
    threads: list[int] = []
    runtime = Runtime(lambda p: threads.append(threading.get_ident()) or {}, "m", "v1", placement=Placement(mode))
    async with served(runtime) as client:
        for _ in range(INLINE_AFTER + 5):
            await client.post("/predict", json={})
    assert {t == threading.get_ident() for t in threads} == {on_loop}


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_module_here:predict", "cannot import 'no_such_module_here'"),
        ("examples.trivial.models:nothing", "'examples.trivial.models' has no callable 'nothing'"),
        ("examples.trivial.models", "expected MODULE:CALLABLE"),
    ],
)
def test_mllambda_runtime_refuses_a_target_it_cannot_load_before_starting_anything(target: str, message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "runtime", target, "--model=m", "--version=v1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--max-connections", "0"], "--max-connections: between 1 and 65536, got 0"),
        (["--max-connections", "70000"], "--max-connections: between 1 and 65536, got 70000"),
        (["--body-budget", "100"], "--body-budget: from 1024 bytes to 1 TiB, got 100"),
        (["--max-body", "0"], "--max-body: at least 1 byte, got 0"),
        (["--max-in-flight", "-1"], r"--max-in-flight: between 0 \(no limit\) and 65536, got -1"),
        (["--queue", "4"], "--queue: between 0 and 65536, and only with --max-in-flight, got 4"),
        (["--max-in-flight", "2", "--queue", "-1"], "--queue: between 0 and 65536"),
        (["--max-in-flight", "2", "--queue-wait", "0"], "--queue-wait: from 0.01 to 600 seconds, got 0"),
        (["--max-in-flight", "2", "--queue-wait", "nan"], "--queue-wait: from 0.01 to 600 seconds, got nan"),
    ],
)
def test_runtime_limits_out_of_range_are_refused_with_the_flag_named(flags: list[str], problem: str) -> None:
    from controlplane.cli import build_parser
    from controlplane.errors import CliError
    from controlplane.node.launch import check_limits

    argv = ["runtime", "examples.trivial.models:count", "--model", "m", "--version", "v1", *flags]
    args = build_parser().parse_args(argv)
    with pytest.raises(CliError, match=problem):
        check_limits(args)


async def test_requests_waiting_for_a_busy_model_are_dropped_when_their_callers_hang_up() -> None:
    """A sync model whose threads are all busy: requests that wait for a thread and whose callers give up
    (Envoy's timeout closes the connection) are never run; the model does not work through a dead backlog."""
    gate, seen = threading.Event(), []

    def blocking(payload: dict[str, Any]) -> dict[str, Any]:
        seen.append(payload["n"])
        gate.wait(10)
        return {"n": payload["n"]}

    workers = min(32, (os.cpu_count() or 1) + 4)  # asyncio's default executor
    runtime = Runtime(blocking, "blocking", "v1", ready=True, placement=Placement("never"))
    async with serving(runtime) as base:
        port = int(base.rsplit(":", 1)[1])

        async def send(n: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            body = json.dumps({"n": n}).encode()
            writer.write(b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            return reader, writer

        busy = [await send(n) for n in range(workers)]
        waiting = [await send(100 + n) for n in range(10)]
        await asyncio.sleep(0.3)  # an observation window: the ten reach the runtime (none may take a thread)
        assert sorted(seen) == list(range(workers))  # every thread taken, ten requests waiting for one
        for _, writer in waiting:
            writer.close()  # their callers give up
        await asyncio.sleep(0.2)  # an observation window: the runtime sees them go (nothing outside tells when)
        gate.set()
        for reader, _ in busy:
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200 ")
        async with aiohttp.ClientSession() as session, session.post(base + "/predict", json={"n": 999}) as resp:
            assert resp.status == 200
        assert sorted(seen) == [*range(workers), 999]  # none of the ten ran
        for _, writer in busy:
            writer.close()


async def in_predict(runtime: Runtime, count: int) -> None:
    """Until `count` requests are inside predict (admitted), within 10 s."""
    deadline = time.monotonic() + 10
    while runtime.admission is None or runtime.admission.in_flight < count:
        assert time.monotonic() < deadline, "the held requests never entered predict"
        await asyncio.sleep(0.01)


async def test_beyond_max_in_flight_a_request_is_a_retriable_503_at_once_not_a_wait() -> None:
    gate = threading.Event()

    def blocking(payload: dict[str, Any]) -> dict[str, Any]:
        gate.wait(10)
        return {"n": payload["n"]}

    runtime = Runtime(blocking, "busy", "v1", ready=True, placement=Placement("never"), admission=Admission(2))
    async with served(runtime) as client:
        held = [asyncio.create_task(client.post("/predict", json={"n": n})) for n in range(2)]
        await in_predict(runtime, 2)
        started = time.monotonic()
        refused = await client.post("/predict", json={"n": 3})
        assert refused.status == 503 and time.monotonic() - started < 1
        assert refused.headers["x-mll-retriable"] == "1"  # the sending Envoy tries another replica
        assert "2 requests in predict (of 2)" in (await refused.json())["error"] and refused.headers["retry-after"]
        gate.set()
        assert [(await t).status for t in held] == [200, 200]
        again = await client.post("/predict", json={"n": 4})
        assert (again.status, await again.json()) == (200, {"n": 4})
        assert runtime.admission is not None and runtime.admission.in_flight == 0


async def test_a_runtime_not_ready_refuses_predict_with_a_retriable_503_and_never_calls_the_model() -> None:
    # Started again under its identity (the supervisor's restart), a runtime is reachable before its loader has
    # run; stopping, it is reachable after it left the catalog. Either way its model is not there: the soak once
    # saw predict raise KeyError (500) a few seconds after a runtime was killed.
    calls.clear()
    runtime = Runtime(model, "doubler", "v1")
    async with served(runtime) as client:
        runtime.ready = False
        refused = await client.post("/predict", json={"n": 1})
        body = await refused.json()
        assert refused.status == 503 and refused.headers["x-mll-retriable"] == "1", body
        assert refused.headers["retry-after"] == "1" and "doubler:v1 is not ready" in body["error"], body
        assert calls == []
        runtime.ready = True
        assert (await client.post("/predict", json={"n": 1})).status == 200 and len(calls) == 1


async def test_admission_counts_per_caller_name_the_first_callers_and_fold_the_rest_into_other() -> None:
    gate = threading.Event()

    def blocking(payload: dict[str, Any]) -> dict[str, Any]:
        gate.wait(10)
        return {}

    runtime = Runtime(blocking, "busy", "v1", ready=True, placement=Placement("never"), admission=Admission(1))
    async with served(runtime) as client:
        held = asyncio.create_task(client.post("/predict", json={}, headers={"x-mll-caller": "heavy"}))
        await in_predict(runtime, 1)
        hostile = 'a"b\\c} x="y'  # a key is what the header held: escaped in the exposition, never breaking it
        for key in ["heavy", hostile, *(f"c{i}" for i in range(40))]:
            assert (await client.post("/predict", json={}, headers={"x-mll-caller": key})).status in (429, 503)
        gate.set()
        assert (await held).status == 200
        text = await (await client.get("/metrics")).text()
        counts = (await (await client.get("/admission")).json())["callers"]  # what the control plane reads
    assert len(counts) == 33 and counts["heavy"] == {"admitted": 1, "saturated": 1}, counts
    assert counts[hostile] == {"saturated": 1} and counts["(other)"] == {"saturated": 42 - 32}, counts
    from prometheus_client.parser import text_string_to_metric_families

    found = {
        (sample.labels["caller"], sample.labels["outcome"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "mllambda_runtime_admission_by_caller"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    callers = {caller for caller, _ in found}
    assert len(callers) == 33 and "(other)" in callers, sorted(callers)  # 32 by name, then the rest folded
    assert found[("heavy", "admitted")] == 1 and found[("heavy", "saturated")] == 1
    assert (hostile, "saturated") in found and found[("(other)", "saturated")] == 42 - 32
