"""Adaptive batching in the runtime SDK: grouping, per-request errors, the bound, through the HTTP app."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from runtime_sdk import Rejected
from runtime_sdk.app import Runtime
from runtime_sdk.batching import Batcher, BatchPolicy, Overloaded
from tests.helpers.runtime import served

calls: list[int] = []


def doubler(payloads: list[dict[str, Any]]) -> list[Any]:
    calls.append(len(payloads))
    if any(p.get("poison") for p in payloads):
        raise ValueError("a row this model cannot take")
    return [Rejected("n must be positive") if p["n"] < 0 else {"doubled": p["n"] * 2} for p in payloads]


@pytest.fixture(autouse=True)
def fresh() -> None:
    calls.clear()


async def test_concurrent_requests_share_calls_and_each_gets_its_own_answer() -> None:
    batcher = Batcher(doubler, BatchPolicy(max_batch=16, max_wait_ms=20))
    answers = await asyncio.gather(*(batcher.submit({"n": i}) for i in range(64)))
    assert answers == [{"doubled": 2 * i} for i in range(64)]
    assert sum(calls) == 64 and max(calls) <= 16 and len(calls) <= 5, calls
    await batcher.close()


async def test_a_lone_request_waits_no_longer_than_max_wait() -> None:
    batcher = Batcher(doubler, BatchPolicy(max_batch=16, max_wait_ms=30))
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await batcher.submit({"n": 1}) == {"doubled": 2}
    assert 0.025 <= loop.time() - started < 0.5
    assert calls == [1]
    await batcher.close()


async def test_errors_stay_with_the_request_that_caused_them() -> None:
    batcher = Batcher(doubler, BatchPolicy(max_batch=8, max_wait_ms=20))
    results = await asyncio.gather(
        batcher.submit({"n": 1}),
        batcher.submit({"n": -1}),
        batcher.submit({"poison": True, "n": 0}),
        batcher.submit({"n": 3}),
        return_exceptions=True,
    )
    assert results[0] == {"doubled": 2} and results[3] == {"doubled": 6}
    assert isinstance(results[1], Rejected)
    assert isinstance(results[2], ValueError)
    assert calls[0] == 4 and sorted(calls[1:]) == [1, 1, 1, 1]  # the failed call, then each on its own
    await batcher.close()


async def test_a_wrong_number_of_answers_is_an_error_not_a_mix_up() -> None:
    batcher = Batcher(lambda payloads: [{"x": 1}], BatchPolicy(max_batch=4, max_wait_ms=20))
    first, second = await asyncio.gather(batcher.submit({}), batcher.submit({}), return_exceptions=True)
    assert first == second == {"x": 1}  # alone, each call gives the one answer it should
    batcher = Batcher(lambda payloads: [], BatchPolicy(max_batch=4, max_wait_ms=1))
    with pytest.raises(TypeError, match="returned 0 answers for 1 requests"):
        await batcher.submit({})


async def test_the_queue_is_bounded_and_refuses_at_once_when_full() -> None:
    release = asyncio.Event()

    entered = asyncio.Event()

    async def stuck(payloads: list[dict[str, Any]]) -> list[Any]:
        entered.set()
        await release.wait()
        return [{} for _ in payloads]

    batcher = Batcher(stuck, BatchPolicy(max_batch=2, max_wait_ms=1, max_queued=4))
    running = [asyncio.create_task(batcher.submit({})) for _ in range(2)]
    await asyncio.wait_for(entered.wait(), 5)  # the first batch runs and holds
    waiting = [asyncio.create_task(batcher.submit({})) for _ in range(4)]
    await asyncio.sleep(0)  # one turn of the loop: the four are queued
    with pytest.raises(Overloaded):
        await batcher.submit({})
    release.set()
    assert len(await asyncio.gather(*running, *waiting)) == 6
    await batcher.close()


async def test_through_the_runtime_batches_show_in_metrics_refusals_are_422_overload_503() -> None:
    runtime = Runtime(
        doubler, "doubler", "v1", ready=True, batch=BatchPolicy(max_batch=8, max_wait_ms=20, max_queued=40)
    )
    async with served(runtime) as client:
        responses = await asyncio.gather(*(client.post("/predict", json={"n": i}) for i in range(32)))
        assert [await r.json() for r in responses] == [{"doubled": 2 * i} for i in range(32)]
        refused = await client.post("/predict", json={"n": -1})
        assert refused.status == 422 and "n must be positive" in (await refused.json())["error"]
        metrics = await (await client.get("/metrics")).text()
        assert 'mllambda_runtime_batch_size_count{model="doubler",version="v1"}' in metrics
        count = next(line for line in metrics.splitlines() if line.startswith("mllambda_runtime_batch_size_count"))
        assert float(count.split()[-1]) < 33  # fewer calls than requests
        flood = await asyncio.gather(*(client.post("/predict", json={"n": 1}) for i in range(200)))
        statuses = [r.status for r in flood]
        assert set(statuses) == {200, 503}, statuses
        for r in flood:
            if r.status == 503:
                assert r.headers["x-mll-retriable"] == "1" and "overloaded" in (await r.json())["error"]
