"""The formats both sides share: a runtime's Consul meta, the Kafka routing table, the watch loop."""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections import Counter
from typing import Any

import pytest

from contract.payload import NotAnObject, encode, parse_object
from contract.routing import KEPT_VERSIONS, PipelineTables, RoutingTable
from contract.service import BadRegistration, RuntimeService, bridge_address
from contract.watch import next_index, watch
from controlplane.pipeline.spec import parse_pipeline
from controlplane.translate.topics import routing_table

SERVICE = RuntimeService("tok-v1-1", "tok", "v1", "10.1.2.3", 7001, "/run/t.sock", 8001, 9001, "/run/e.sock", 19001)


def entry(meta: dict[str, str], service_id: str = "tok-v1-1", checks: tuple[str, ...] = ("passing",)) -> dict[str, Any]:
    return {
        "Node": {"Address": "10.9.9.9"},
        "Service": {"ID": service_id, "Address": "10.1.2.3", "Meta": meta, "Port": 8001},
        "Checks": [{"Status": status} for status in checks],
    }


def test_the_meta_a_runtime_writes_is_what_the_control_plane_reads() -> None:
    read = RuntimeService.from_entry(entry(SERVICE.to_meta()))
    assert read == RuntimeService(**{**SERVICE.__dict__, "passing": True})
    assert read.cluster == "tok.v1"
    assert not RuntimeService.from_entry(entry(SERVICE.to_meta(), checks=("passing", "critical"))).passing


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"ingress_port": "-1"}, "'ingress_port' is not a port number"),
        ({"runtime_port": "http"}, "'runtime_port' is not a port number"),
        ({"egress_port": "70000"}, "'egress_port' is not a port number"),
        ({"model": ""}, "'model' is missing"),
        ({"envoy_admin_port": "x"}, "'envoy_admin_port' is not a port number"),
        ({"runtime_uds": "/run/" + "x" * 104}, "'runtime_uds' is not a Unix socket path"),
        ({"runtime_uds": "relative.sock"}, "'runtime_uds' is not a Unix socket path"),
        ({"egress_uds": "/run/a\nb.sock"}, "'egress_uds' is not a Unix socket path"),
    ],
)
def test_a_registration_that_does_not_fit_the_schema_is_refused_with_the_reason(
    change: dict[str, str], reason: str
) -> None:
    with pytest.raises(BadRegistration, match=reason):
        RuntimeService.from_entry(entry({**SERVICE.to_meta(), **change}))


def test_missing_meta_or_a_missing_service_is_refused_not_a_crash() -> None:
    meta = SERVICE.to_meta()
    del meta["version"]
    for bad in (entry(meta), {"Checks": []}, entry({}), {"Service": None}):
        with pytest.raises(BadRegistration):
            RuntimeService.from_entry(bad)


def test_a_bridge_is_read_only_for_its_own_deployment() -> None:
    bridge = {"Node": {"Address": "10.0.0.1"}, "Service": {"Port": 18003, "Meta": {"kv_prefix": "a/"}}}
    assert bridge_address(bridge, "a/") == ("10.0.0.1", 18003)
    assert bridge_address(bridge, "b/") is None
    assert bridge_address({"Service": {"Port": "x", "Meta": {"kv_prefix": "a/"}}}, "a/") is None


PIPELINE = parse_pipeline(
    {
        "name": "p",
        "transport": "kafka",
        "stages": [
            {"name": "a", "variants": [{"model": "m", "version": "v1", "weight": 9}, {"model": "m", "version": "v2"}]},
            {
                "name": "b",
                "branch_on": "kind",
                "branches": [
                    {"key": "x", "variants": [{"model": "bx", "version": "v1"}]},
                    {"key": "y", "variants": [{"model": "by", "version": "v1"}]},
                ],
                "shadow": {"model": "bs", "version": "v1", "percent": 50},
            },
        ],
    }
)


def test_a_routing_table_survives_its_trip_through_consul_kv() -> None:
    table = routing_table(PIPELINE, 7)
    assert RoutingTable.from_json(table.to_json()) == table
    assert RoutingTable.from_json(table.inactive().to_json()).active is False


@pytest.mark.parametrize("text", ["not json", "[]", '{"pipeline": "p"}', '{"stages": 3}'])
def test_a_broken_routing_table_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        RoutingTable.from_json(text)


def test_next_topics_follow_weights_branches_and_shadows() -> None:
    table, rng = routing_table(PIPELINE, 1), random.Random(7)
    first = Counter(table.next_topics(0, {}, rng)[0] for _ in range(2000))
    assert abs(first["mll.p.a.m.v2"] / 2000 - 0.1) < 0.03
    picks = [table.next_topics(1, {"kind": "y"}, rng) for _ in range(400)]
    assert {p[0] for p in picks} == {"mll.p.b.by.v1"}
    assert 0.4 < sum(len(p) == 2 for p in picks) / 400 < 0.6  # the shadow copy
    assert table.next_topics(2, {}, rng) == ["mll.p.out"]
    with pytest.raises(LookupError, match="no branch for kind='z'"):
        table.next_topics(1, {"kind": "z"}, rng)
    assert table.subscriptions("bs.v1") == {"mll.p.b.bs.v1_shadow": (1, True)}


def test_an_index_that_goes_backwards_starts_over() -> None:
    assert next_index(10, "12") == 12
    assert next_index(10, 3) == 0
    assert next_index(10, None) == 0
    assert next_index(10, "garbage") == 0


async def test_watch_passes_indexes_back_survives_errors_and_bad_answers() -> None:
    asked: list[int | None] = []
    answers: list[Any] = [(5, "a"), RuntimeError("consul away"), (9, "boom"), (4, "b"), (6, "c")]
    taken: list[str] = []
    errors: list[str] = []

    async def query(index: int | None) -> tuple[int, str]:
        asked.append(index)
        if not answers:
            await asyncio.Event().wait()  # block like a quiet Consul
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    def take(value: str) -> None:
        if value == "boom":
            raise ValueError("a bad answer")
        taken.append(value)

    task = asyncio.create_task(watch(query, take, what="test", on_error=lambda what, err: errors.append(str(err))))
    for _ in range(200):
        if len(asked) == 6:
            break
        await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert taken == ["a", "b", "c"]  # the bad answer did not end the watch
    assert errors == ["consul away"]
    assert asked == [None, 5, 5, 9, None, 6]  # 4 < 9: start over (None = a non-blocking first read)


def test_the_last_few_table_versions_are_kept_and_a_message_finds_its_own() -> None:
    tables = PipelineTables((routing_table(PIPELINE, 1),))
    for n in range(2, 7):
        tables = tables.with_newest(routing_table(PIPELINE, n))
    assert [t.version for t in tables.tables] == list(range(7 - KEPT_VERSIONS, 7))
    assert tables.get(None) is tables.newest and tables.get(6) is tables.newest
    assert tables.get(1) is None  # too old: such a message is dead-lettered with the reason
    assert PipelineTables.from_json(tables.to_json()) == tables
    assert PipelineTables.from_json(tables.inactive().to_json()).newest.active is False
    assert PipelineTables.from_json(routing_table(PIPELINE, 9).to_json()).newest.version == 9  # the older layout
    assert "mll.p.b.bs.v1_shadow" in tables.topics("bs.v1")
    for bad in ("[]", "{}", "[1]", "nope"):
        with pytest.raises(ValueError):
            PipelineTables.from_json(bad)


def test_a_version_named_like_a_shadow_topic_gets_its_own_topic() -> None:
    from contract.naming import hop_topic, model_cluster

    assert hop_topic("p", "s", model_cluster("m", "v1.shadow")) != hop_topic("p", "s", model_cluster("m", "v1"), True)


async def test_a_record_of_a_pipeline_without_tables_here_waits_uncommitted_and_is_never_skipped() -> None:
    """Found by bench.soak: after a Consul restart the entry router met a record of a pipeline whose tables were
    not back yet, could not even dead-letter it, and skipped it (one message lost)."""
    from contract.kafka_io import NoRoutingTable, is_poison
    from controlplane.kafka.plane import KafkaPlane

    plane = KafkaPlane("127.0.0.1:1", client=None, kv_prefix="p/", reply_topic="r")  # type: ignore[arg-type]
    plane.producer = object()  # type: ignore[assignment]  # never reached: nothing is sent
    for attempt in (plane._enter("gone", b'{"text": "x"}', []), plane._poisoned("gone", None, "why")):
        try:
            await attempt
        except NoRoutingTable as err:
            assert not is_poison(err)  # consume_batches stops uncommitted on it: the record is read again
        else:
            raise AssertionError("a record without tables went through")


@pytest.mark.parametrize(
    ("body", "read"),
    [
        (b'\xef\xbb\xbf{"a": 1}', {"a": 1}),  # a byte order mark: orjson refuses it, the standard library reads it
        (b'{"a": NaN, "b": -Infinity}', {"a": "nan", "b": "-inf"}),  # not JSON, read as before (numbers)
        (b'{"a": "\\ud800"}', {"a": "\ud800"}),  # a lone surrogate in an escape
        (b'{"a": 123456789012345678901234567890}', {"a": 1.2345678901234568e29}),  # beyond 64 bits: a float
        (bytearray(b'{"a": [1, 2.5, "x"]}'), {"a": [1, 2.5, "x"]}),
        (memoryview(b'{"a": null}'), {"a": None}),
    ],
)
def test_a_body_is_read_as_the_standard_library_reads_it_by_orjson_where_it_can(body: Any, read: Any) -> None:
    got = parse_object(body)
    shown = {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in got.items()}
    assert shown == read


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"[" * 20_000 + b"]" * 20_000, "nested too deeply"),
        (b'{"a": 1', "not valid JSON"),
        (b'{"a": "\xff"}', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got list"),
        (b"", "not valid JSON"),
    ],
)
def test_what_is_no_json_object_is_refused_with_the_reason(body: bytes, says: str) -> None:
    with pytest.raises(NotAnObject, match=says):
        parse_object(body)


def test_an_answer_is_written_by_orjson_and_what_it_cannot_write_by_the_standard_library() -> None:
    deep: Any = []
    for _ in range(300):  # beyond orjson's 254 levels
        deep = [deep]
    for value in ({"n": 2**70}, {"s": "\ud800"}, {"d": deep}, {1: "int key"}, {"t": (1, 2)}):
        assert json.loads(encode(value)) == json.loads(json.dumps(value)), value
    assert json.loads(encode({"a": math.nan, "b": math.inf})) == {"a": None, "b": None}  # JSON has no NaN
    for value in ({"s": {1, 2}}, {"o": object()}):
        with pytest.raises(TypeError):
            encode(value)
