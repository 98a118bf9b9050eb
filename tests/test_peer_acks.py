"""Control planes count each other's sidecars before a version takes traffic (controlplane/delivery/peer_acks.py).

The rule and the record format on plain data; the records through a real Consul agent: written under
a session, read by the others, a malformed one skipped, a stopped control plane's record gone.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import consul.aio
import pytest

from controlplane.delivery.peer_acks import HOLD, MAX_RECORD, PeerRecord, SharedAcks, decode, encode, wait_reason
from controlplane.delivery.reconcile import Reconciler
from controlplane.translate.pipelines import Options
from controlplane.xds.acks import AckBook
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.snapshot import ROUTE
from tests.helpers.envoy import wait_for
from tests.helpers.translation import PIPELINE, RUNTIMES, steady

P1 = ("p", 1)


def record(holder: str, groups: set[str], ready: set[tuple[str, int]]) -> PeerRecord:
    return PeerRecord(holder, frozenset(groups), frozenset(ready))


def test_a_group_on_another_control_plane_is_waited_for_until_that_one_records_the_version() -> None:
    other = {"b": record("b", {"s1"}, set())}
    assert "streams to control plane b, not acknowledged there yet" == wait_reason("s1", P1, other, None, 0.0)
    assert wait_reason("s1", P1, {"b": record("b", {"s1"}, {P1})}, None, 0.0) is None
    # Listed by two (one of them stale, its writer cut off): both must have it.
    two = {"b": record("b", {"s1"}, {P1}), "c": record("c", {"s1"}, set())}
    assert "control plane c" in (wait_reason("s1", P1, two, None, 0.0) or "")


def test_a_group_that_streams_nowhere_is_waited_for_only_while_it_may_be_reconnecting() -> None:
    assert "streams to no control plane for 3.0s" in (wait_reason("s1", P1, {}, 10.0, 13.0) or "")
    assert wait_reason("s1", P1, {}, 10.0, 10.0 + HOLD + 0.1) is None  # away too long: not held for
    assert wait_reason("s1", P1, {}, None, 13.0) is None  # never seen streaming (an Envoy that never came up)


def test_records_round_trip_and_a_malformed_one_says_what_is_wrong() -> None:
    mine = record("cp-1", {"s1", "s2"}, {P1, ("q", 7)})
    assert decode(encode(mine)) == mine
    bad = [
        None,
        b"",
        b"\xff\xfe",
        b"not json",
        b"[1, 2]",
        b'{"holder": 1, "groups": [], "ready": []}',
        b'{"holder": "x", "groups": "s1", "ready": []}',
        b'{"holder": "x", "groups": [""], "ready": []}',
        b'{"holder": "x", "groups": ["' + b"a" * 300 + b'"], "ready": []}',
        b'{"holder": "x", "groups": [], "ready": [["p"]]}',
        b'{"holder": "x", "groups": [], "ready": [["p", "1"]]}',
        b'{"holder": "x", "groups": [], "ready": [["p", 0]]}',
        b'{"holder": "x", "groups": [], "ready": [["p", true]]}',
        b"{" + b" " * MAX_RECORD + b"}",
    ]
    for raw in bad:
        with pytest.raises(ValueError):
            decode(raw)


def test_a_record_too_large_for_consul_leaves_groups_out_rather_than_failing() -> None:
    many = {f"sidecar-{n:06d}-" + "x" * 200 for n in range(4_000)}  # ~900 KB of names
    raw = encode(record("cp-1", many, {P1}))
    assert len(raw) <= MAX_RECORD
    kept = decode(raw)
    assert kept.ready == {P1} and 0 < len(kept.groups) < len(many) and kept.groups <= many


def reconciled() -> tuple[Reconciler, AckBook, SnapshotCache]:
    cache, acks = SnapshotCache(), AckBook()
    reconciler = Reconciler(cache, acks, Options())
    reconciler.reconcile(steady(PIPELINE), RUNTIMES, ())
    return reconciler, acks, cache


def test_sidecars_that_do_not_stream_here_are_judged_by_the_other_control_planes() -> None:
    reconciler, acks, cache = reconciled()
    assert reconciler.missing_acks(P1) == []  # alone, as before: only the sidecars streaming here count
    asked: list[tuple[str, Any, Any]] = []

    def elsewhere(group: str, pair: tuple[str, int], gone: float | None) -> str | None:
        asked.append((group, pair, gone))
        return "streams to control plane b, not acknowledged there yet" if group == "ma-v1-1" else None

    assert reconciler.missing_acks(P1, elsewhere) == [
        "ma-v1-1 (streams to control plane b, not acknowledged there yet)"
    ]
    assert {g for g, _, _ in asked} == {
        "ma-v1-1",
        "mb-v1-2",
    }  # those that route p/1 and take requests (mb-v2-3 is not passing)
    # Streaming here, its own ACK decides; what others say of it is not asked.
    acks.connected("ma-v1-1", +1)
    acks.ack("ma-v1-1", "ma-v1-1", ROUTE, cache.get("ma-v1-1").version)  # type: ignore[union-attr]
    asked.clear()
    assert reconciler.missing_acks(P1, elsewhere) == []
    assert {g for g, _, _ in asked} == {"mb-v1-2"}
    acks.connected("ma-v1-1", -1)
    reconciler.missing_acks(P1, elsewhere)
    assert next(gone for g, _, gone in asked if g == "ma-v1-1") is not None  # when it left is passed on


def test_this_control_planes_record_lists_its_sidecars_and_what_all_of_them_have() -> None:
    reconciler, acks, cache = reconciled()
    assert reconciler.local_view() == (frozenset(), frozenset({P1}))  # none here: nothing to wait for
    acks.connected("ma-v1-1", +1)
    acks.connected("mb-v1-2", +1)
    acks.connected("gateway", +1)  # the gateway is never in it (it is judged apart)
    assert reconciler.local_view() == (frozenset({"ma-v1-1", "mb-v1-2"}), frozenset())
    acks.ack("ma-v1-1", "ma-v1-1", ROUTE, cache.get("ma-v1-1").version)  # type: ignore[union-attr]
    assert reconciler.local_view()[1] == frozenset()  # one of the two has it: not ready
    for group in ("ma-v1-1", "mb-v1-2"):
        acks.ack(group, group, ROUTE, cache.get(group).version)  # type: ignore[union-attr]
    assert reconciler.local_view()[1] == {P1}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_records_through_consul_a_bad_one_skipped_a_stopped_one_gone(consul_agent: Any) -> None:
    prefix = f"test-peers-{consul_agent.http_port}/"
    clients = [consul.aio.Consul(port=consul_agent.http_port) for _ in range(3)]
    view_a = (frozenset({"s1"}), frozenset({P1}))
    clock = Clock()
    a = SharedAcks(clients[0], prefix, lambda: view_a, lambda: None)
    b = SharedAcks(clients[1], prefix, lambda: (frozenset(), frozenset()), lambda: None, clock)
    tasks = [asyncio.create_task(a.run()), asyncio.create_task(b.run())]
    try:
        assert "not read yet" in (b.reason("s1", P1, None) or "")
        await wait_for(lambda: a.id in b.records)
        assert b.reason("s1", P1, None) is None  # a's sidecar has p/1
        assert "control plane" in (b.reason("s1", ("p", 2), None) or "")  # ... but not p/2
        # Someone writes garbage beside the records: it is skipped and reported; a's still counts.
        await clients[2].kv.put(prefix.rstrip("/") + "-controlplanes/junk", b"\x00{not json")
        await wait_for(lambda: "junk" in b.broken)
        assert a.id in b.records and b.reason("s1", ("p", 2), None) is not None
        assert b.report()["others"][a.id] == {"holder": a.id, "sidecars": 1, "ready": [["p", 1]]}
        assert "not JSON" in b.report()["skipped"]["junk"]
        # A stops: its session goes, and the record with it. Its sidecar is waited for while it may reconnect.
        tasks[0].cancel()
        await a.stop()
        await wait_for(lambda: a.id not in b.records)
        assert "streams to no control plane" in (b.reason("s1", ("p", 2), None) or "")
        clock.now += HOLD + 1
        assert b.reason("s1", ("p", 2), None) is None
        stored = await clients[2].kv.get(prefix.rstrip("/") + "-controlplanes/", recurse=True)
        assert [item["Key"].rsplit("/", 1)[1] for item in stored[1]] == sorted(["junk", b.id])
        assert json.loads(stored[1][0 if stored[1][0]["Key"].endswith(b.id) else 1]["Value"])["groups"] == []
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await b.stop()
        await clients[2].kv.delete(prefix.rstrip("/") + "-controlplanes/", recurse=True)
        for client in clients:
            await client.close()
