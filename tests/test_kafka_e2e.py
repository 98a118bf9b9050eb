"""The same pipelines over Kafka topics (real tansu broker), switched by `mllambda apply`."""

from __future__ import annotations

import asyncio
import collections
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import consul
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from contract.naming import hop_group, hop_topic, routing_table_prefix
from controlplane.node.processes import http_get
from tests.helpers.components import passing
from tests.helpers.envoy import near_share, wait_for
from tests.helpers.kafka import consume, group_members, served
from tests.helpers.pipelines import (
    M,
    apply,
    in_traffic,
    pipeline,
    post,
    runtime_metric,
    service_meta,
    switch_under_load,
    until_ok,
)

pytestmark = pytest.mark.slow


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()


def predictions(consul_port: int, runtime: Any) -> int:
    """How many predicts a runtime has run, whatever the transport."""
    return runtime_metric(consul_port, runtime.model, runtime.service_id, "mllambda_runtime_predict_seconds_count")


async def test_kafka_returns_what_http_returns_via_bridge_and_user_topics(
    kafka_plane: Any, kafka_bootstrap: str, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    runtimes = passing(*(start_runtime(f"{M}:{m}", m, "v1", wait=False) for m in ("tokenize", "count", "score")))
    url = f"http://127.0.0.1:{kafka_plane.gateway_port}/pipelines/words"
    apply(kafka_plane, tmp_path, pipeline("words"))
    _, over_http, _ = await until_ok(url, {"text": "one two three"})

    spec = {**pipeline("words", transport="kafka"), "input_topic": "user-in", "output_topic": "user-out"}
    apply(kafka_plane, tmp_path, spec)
    await in_traffic(kafka_plane, "words", 2)  # its consumers have joined; the gateway sends to the bridge
    _, over_kafka, chain = await until_ok(url, {"text": "one two three"}, timeout=60)
    assert over_kafka == over_http == {"count": 3, "score": 30}
    assert chain == "tokenize=tokenize:v1, count=count:v1, score=score:v1"

    # Users' own topics: 20 messages of 10..29 words in, 20 results out (beside the bridge's 3-word ones).
    texts = [" ".join(["w"] * n) for n in range(10, 30)]
    await produce(kafka_bootstrap, "user-in", [json.dumps({"text": t}).encode() for t in texts])

    async def user_results() -> list[int]:
        records = await consume(kafka_bootstrap, "user-out", 21)
        return sorted(c for r in records if (c := json.loads(r.value)["count"]) >= 10)

    assert await user_results() == list(range(10, 30))

    # Routing tables that vanish from Consul (an agent restarted empty) are written again within seconds.
    agent = consul.Consul(port=kafka_plane.consul_port)
    key = f"{routing_table_prefix(kafka_plane.kv_prefix)}words"
    agent.kv.delete(key)
    await wait_for(lambda: agent.kv.get(key)[1] is not None, timeout=10)
    assert (await until_ok(url, {"text": "one two three"}, timeout=30))[1] == over_http

    # The runtimes reached the broker through their sidecars' Kafka listeners.
    admin = service_meta(kafka_plane.consul_port, "count", runtimes[1].service_id)["envoy_admin_port"]
    _, stats = http_get(f"http://127.0.0.1:{admin}/stats?filter=cluster.kafka-broker.upstream_cx_total")
    assert int(stats.strip().rsplit(" ", 1)[1]) > 0, stats


async def test_kafka_split_and_dead_letters(
    kafka_plane: Any, kafka_bootstrap: str, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    passing(
        *(start_runtime(f"{M}:{model}", model, "v1", wait=False) for model in ("tokenize", "count", "score")),
        start_runtime(f"{M}:score_v2", "score", "v2", wait=False),
    )
    split = [{"model": "score", "version": "v1", "weight": 90}, {"model": "score", "version": "v2", "weight": 10}]
    apply(kafka_plane, tmp_path, pipeline("kx", transport="kafka", variants=split))
    await until_ok(f"http://127.0.0.1:{kafka_plane.gateway_port}/pipelines/kx", {"text": "warm up"}, timeout=60)

    good = [json.dumps({"text": "a b"}).encode()] * 2000
    bad = [b"not json at all", b"[1, 2, 3]", json.dumps({"no_text": True}).encode()]
    await produce(kafka_bootstrap, "mll.kx.in", good[:1000] + bad + good[1000:])
    results = await consume(kafka_bootstrap, "mll.kx.out", 2001, timeout=180)
    chains = collections.Counter(served(r).rsplit(", ", 1)[-1] for r in results)
    assert near_share(chains["score=score:v2"], sum(chains.values()), 0.10), chains

    parked = [json.loads(r.value) for r in await consume(kafka_bootstrap, "mll.kx.dlq", 3)]
    by_payload = {p["payload"]: p["error"] for p in parked}
    assert by_payload == {
        "not json at all": "not valid input: body is not valid JSON: Expecting value: line 1 column 1 (char 0)",
        "[1, 2, 3]": "not valid input: body must be a JSON object, got list",
        '{"no_text": true}': "refused: expected {'text': '<a string>'}",
    }

    start_runtime(f"{M}:broken", "broken", "v1")
    broken = {
        "name": "kb",
        "transport": "kafka",
        "stages": [{"name": "b", "variants": [{"model": "broken", "version": "v1"}]}],
    }
    apply(kafka_plane, tmp_path, broken)
    await in_traffic(kafka_plane, "kb", 1)  # its topics and consumers are there
    await produce(kafka_bootstrap, "mll.kb.in", [b'{"x": 1}'])
    parked = [json.loads(r.value) for r in await consume(kafka_bootstrap, "mll.kb.dlq", 1)]
    assert parked[0]["error"] == "predict failed: RuntimeError: this model always fails"

    # Through the bridge, the caller learns that the model failed, and the id to look up, never its exception text.
    async with aiohttp.ClientSession() as session:
        status, told, _ = await post(session, f"http://127.0.0.1:{kafka_plane.gateway_port}/pipelines/kb", {"x": 2})
    assert status == 422 and told["error"] == "model broken:v1 failed (RuntimeError); see mll.kb.dlq", told
    parked = [json.loads(r.value) for r in await consume(kafka_bootstrap, "mll.kb.dlq", 2)]
    assert [p["error"] for p in parked if p["error_id"] == told["error_id"]] == [
        "predict failed: RuntimeError: this model always fails"
    ]


async def test_switching_http_kafka_http_loses_no_request(
    kafka_plane: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    passing(*(start_runtime(f"{M}:{model}", model, "v1", wait=False) for model in ("tokenize", "count", "score")))
    outcomes = await switch_under_load(kafka_plane, tmp_path, "flip", ["kafka", "http", "kafka", "http"], 2.0)
    assert set(outcomes) == {200}, outcomes


async def test_killing_a_replica_mid_stream_loses_no_message(
    kafka_plane: Any, kafka_bootstrap: str, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    _, doomed, _, _ = passing(
        *(start_runtime(f"{M}:{m}", m, "v1", wait=False) for m in ("tokenize", "count", "count", "score"))
    )
    apply(kafka_plane, tmp_path, pipeline("kk", transport="kafka"))
    await until_ok(f"http://127.0.0.1:{kafka_plane.gateway_port}/pipelines/kk", {"text": "warm"}, timeout=60)
    group = hop_group(hop_topic("kk", "count", "count.v1"))

    async def both_joined() -> bool:
        return await group_members(kafka_bootstrap, group) == 2

    await wait_for(both_joined, 30, every=0.5)  # the group is stable with both replicas (a broker call a look)

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for n in range(2, 302):  # n words: the result's count says which message it was
            await producer.send_and_wait("mll.kk.in", json.dumps({"text": " ".join(["w"] * n)}).encode())
            if n == 60:  # kill the replica once it has done some of the work (rebalancing takes a few heartbeats)
                await wait_for(lambda: asyncio.to_thread(predictions, kafka_plane.consul_port, doomed), 30)
                doomed.proc.signal(signal.SIGKILL)
            await asyncio.sleep(0.01)
    finally:
        await producer.stop()

    seen: set[int] = set()
    consumer = AIOKafkaConsumer(
        "mll.kk.out", bootstrap_servers=kafka_bootstrap, group_id="kill-test", auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        async with asyncio.timeout(120):
            while not set(range(2, 302)) <= seen:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    seen.update(json.loads(r.value)["count"] for r in records)
    finally:
        await consumer.stop()
    assert set(range(2, 302)) <= seen


async def test_a_broker_that_is_away_delays_no_http_pipeline_and_kafka_catches_up_by_itself(
    control_plane: Any, gateway: Any, start_runtime: Any, tmp_path: Path, logs_dir: Path, request: Any
) -> None:
    from controlplane.node import processes
    from controlplane.node.tools import find_tansu

    port = processes.free_port()
    control_plane.stop()
    control_plane.env = {"MLLAMBDA_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}"}  # nothing listens there yet
    control_plane.start()
    passing(*(start_runtime(f"{M}:{model}", model, "v1", wait=False) for model in ("tokenize", "count", "score")))
    base = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines"
    apply(control_plane, tmp_path, pipeline("late", transport="kafka"))
    described = control_plane.cli("describe", "pipeline", "late")
    assert "Kafka broker" in described.stdout, described.stdout  # what it waits for, said

    apply(control_plane, tmp_path, pipeline("web"))  # HTTP pipelines deploy as if Kafka were not configured
    await in_traffic(control_plane, "web", 1, timeout=10)
    _, body, _ = await until_ok(f"{base}/web", {"text": "a b"}, timeout=10)
    assert body == {"count": 2, "score": 20}

    tansu = find_tansu()
    assert tansu is not None
    broker = processes.ManagedProcess("tansu", processes.tansu_argv(tansu, port), logs_dir / f"tansu-{port}.log")
    request.addfinalizer(broker.stop)
    broker.start().wait_ready(processes.tcp_ready(port), timeout=30)
    await in_traffic(control_plane, "late", 1, timeout=90)  # no further change needed: retried with backoff
    _, body, chain = await until_ok(f"{base}/late", {"text": "a b c"}, timeout=30)
    assert body == {"count": 3, "score": 30} and chain.startswith("tokenize=")


async def test_a_stage_inserted_in_front_moves_every_message_once_from_a_user_topic(
    kafka_plane: Any, kafka_bootstrap: str, start_runtime: Any, tmp_path: Path
) -> None:
    """v1 [tokenize, count, score] -> v2 [echo, tokenize, count, score] while input keeps arriving on a user topic."""
    passing(*(start_runtime(f"{M}:{m}", m, "v1", wait=False) for m in ("tokenize", "count", "score", "echo")))
    v1 = {**pipeline("ins", transport="kafka"), "input_topic": "ins-in", "output_topic": "ins-out"}
    apply(kafka_plane, tmp_path, v1)
    await in_traffic(kafka_plane, "ins", 1)
    sizes = [1 + i % 5 for i in range(600)]
    messages = [(json.dumps({"text": " ".join(["w"] * n)}).encode(), []) for n in sizes]

    from tests.helpers.kafka import send

    async def paced() -> None:  # over ~8 s, so that the switch happens while messages flow
        for start in range(0, len(messages), 15):
            await send(kafka_bootstrap, "ins-in", messages[start : start + 15])
            await asyncio.sleep(0.2)

    sending = asyncio.create_task(paced())
    await asyncio.sleep(1.0)  # load duration: messages flow before the change
    echo = {"name": "echo", "variants": [{"model": "echo", "version": "v1"}]}
    apply(kafka_plane, tmp_path, {**v1, "stages": [echo, *v1["stages"]]})
    await sending
    await in_traffic(kafka_plane, "ins", 2)
    results = await consume(kafka_bootstrap, "ins-out", len(sizes), timeout=120)
    extra = await consume(kafka_bootstrap, "ins-out", len(sizes) + 1, timeout=3, missing_ok=True)
    assert len(extra) == len(sizes)  # one message in, one out: none looped, none twice
    assert sorted(json.loads(r.value)["score"] for r in results) == sorted(n * 10 for n in sizes)
    chains = collections.Counter(served(r).split("=", 1)[0] for r in results)
    assert set(chains) <= {"tokenize", "echo"} and chains["echo"] > 0, chains  # the new path took over


async def test_an_input_topic_that_changes_between_versions_is_followed_and_the_old_one_drained(
    kafka_plane: Any, kafka_bootstrap: str, start_runtime: Any, tmp_path: Path
) -> None:
    from tests.helpers.kafka import send

    passing(*(start_runtime(f"{M}:{model}", model, "v1", wait=False) for model in ("tokenize", "count", "score")))
    v1 = {**pipeline("mv", transport="kafka"), "input_topic": "mv-a", "output_topic": "mv-out"}
    apply(kafka_plane, tmp_path, v1)
    await in_traffic(kafka_plane, "mv", 1)
    await send(kafka_bootstrap, "mv-a", [(json.dumps({"text": "a"}).encode(), [])] * 20)
    apply(kafka_plane, tmp_path, {**v1, "input_topic": "mv-b"})
    await send(kafka_bootstrap, "mv-a", [(json.dumps({"text": "a b"}).encode(), [])] * 20)  # late, on the old one
    await in_traffic(kafka_plane, "mv", 2)
    await send(kafka_bootstrap, "mv-b", [(json.dumps({"text": "a b c"}).encode(), [])] * 20)
    results = await consume(kafka_bootstrap, "mv-out", 60, timeout=90)
    scores = collections.Counter(json.loads(r.value)["score"] for r in results)
    assert scores == {10: 20, 20: 20, 30: 20}, scores  # the new topic is read, the old one drained
