"""Poison messages and broken consumers on the Kafka path (real tansu, control plane, runtimes).

Every poison record goes to the dead-letter topic with its reason and the
consumer goes on; a consumer that dies of a fault that is not the record's is
started again and the record is delivered once; whoever produces to a topic
cannot choose where a result is sent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from controlplane.node.processes import http_get
from tests.helpers.components import passing
from tests.helpers.envoy import wait_for
from tests.helpers.kafka import consume, send, served
from tests.helpers.pipelines import M, apply, in_traffic, pipeline, runtime_metric, service_meta

pytestmark = pytest.mark.slow


async def test_poison_records_are_parked_with_their_reason_and_nothing_else_stops(
    kafka_plane: Any, kafka_bootstrap: str, start_runtime: Any, tmp_path: Path
) -> None:
    runtimes = passing(*(start_runtime(f"{M}:{m}", m, "v1", wait=False) for m in ("tokenize", "count", "score")))
    apply(
        kafka_plane, tmp_path, {**pipeline("px", transport="kafka"), "input_topic": "px-in", "output_topic": "px-out"}
    )
    await in_traffic(kafka_plane, "px", 1)

    good = json.dumps({"text": "a b"}).encode()
    deep = b"[" * 100_000 + b"]" * 100_000
    await send(
        kafka_bootstrap,
        "px-in",
        [
            (good, []),
            (None, []),  # a tombstone
            (deep, []),  # RecursionError in a JSON parser
            (b"\xff\xfe not utf-8", []),
            (good, [("x-user", b"\xff\xfe"), ("mll-reply-to", b"px-stolen"), ("mll-version", b"\xff")]),
            (b"x" * 900_000, []),  # not JSON, and its dead-letter record would be over the broker's limit
            (good, []),
        ],
    )
    # Straight onto the last hop's topic, as any client of the broker could.
    last = "mll.px.score.score.v1"
    forged = [("mll-version", b"1"), ("mll-reply-to", b"px-stolen")]
    await send(kafka_bootstrap, last, [(json.dumps({"count": 9}).encode(), forged), (None, forged), (deep, forged)])

    results = await consume(kafka_bootstrap, "px-out", 4, timeout=60)
    assert sorted(json.loads(r.value)["score"] for r in results) == [20, 20, 20, 90]
    assert all(served(r) for r in results)
    parked = [json.loads(r.value) for r in await consume(kafka_bootstrap, "mll.px.dlq", 6, timeout=60)]
    reasons = sorted(p["error"] for p in parked)
    assert sum("tombstone" in r for r in reasons) == 2, reasons
    assert sum("nested too deeply" in r for r in reasons) == 2, reasons
    assert sum("not valid JSON" in r for r in reasons) == 2, reasons
    assert all(len(r) <= 500 for r in reasons)
    huge = next(p for p in parked if p.get("payload_bytes") == 900_000)
    assert huge["truncated"] and len(huge["payload"]) <= 256 * 1024

    stolen = await consume(kafka_bootstrap, "px-stolen", 1, timeout=3, missing_ok=True)
    assert stolen == []  # a producer's reply topic is never used
    for runtime in runtimes:
        assert runtime.proc.popen.poll() is None, f"{runtime.service_id} died"
        restarts = runtime_metric(
            kafka_plane.consul_port, runtime.model, runtime.service_id, "mllambda_runtime_kafka_consumer_restarts_total"
        )
        assert restarts == 0  # poison is not a reason to restart


async def test_a_consumer_killed_by_a_fault_is_started_again_and_loses_nothing(
    kafka_plane: Any, kafka_bootstrap: str, start_runtime: Any, tmp_path: Path
) -> None:
    start_runtime(f"{M}:tokenize", "tokenize", "v1")
    flaky = start_runtime(f"{M}:flaky_once", "count", "v1")
    start_runtime(f"{M}:score", "score", "v1")
    apply(kafka_plane, tmp_path, {**pipeline("fx", transport="kafka"), "output_topic": "fx-out"})
    await in_traffic(kafka_plane, "fx", 1)
    await send(kafka_bootstrap, "mll.fx.in", [(json.dumps({"text": "w " * (i + 1)}).encode(), []) for i in range(5)])

    # The batch the fault hit is read again: at least once, so a record may come out twice, none is lost.
    results = await consume(kafka_bootstrap, "fx-out", 5, timeout=90)
    results = await consume(kafka_bootstrap, "fx-out", 10, timeout=3, missing_ok=True)
    assert {json.loads(r.value)["score"] for r in results} == {10, 20, 30, 40, 50}

    def restarts() -> float:
        return runtime_metric(
            kafka_plane.consul_port, "count", flaky.service_id, "mllambda_runtime_kafka_consumer_restarts_total"
        )

    assert await wait_for(lambda: restarts() >= 1, timeout=10)
    meta = service_meta(kafka_plane.consul_port, "count", flaky.service_id)
    _, body = http_get(f"http://127.0.0.1:{meta['ingress_port']}/readyz")
    assert "kafka_consumers_restarting" not in json.loads(body)  # running again: nothing to report
