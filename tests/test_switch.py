"""The staged change protocol on plain data: when a version takes traffic, and when an old one goes."""

from __future__ import annotations

from controlplane.delivery.reconcile import KEEP_VERSIONS, GroupLedger
from controlplane.delivery.switch import DRAIN_MARGIN, SLOW_AFTER, Switchboard
from controlplane.pipeline.model import PipelineVersion
from controlplane.pipeline.spec import parse_pipeline


def version(n: int, timeout_ms: int = 2000, name: str = "p") -> PipelineVersion:
    stage = {"name": "a", "variants": [{"model": "m", "version": "v1"}], "timeout_ms": timeout_ms}
    return PipelineVersion(parse_pipeline({"name": name, "stages": [stage]}), n, "t", "test")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def entries(board: Switchboard) -> dict[str, tuple[int | None, list[int]]]:
    return {
        d.routed[0].pipeline.name: (d.entry.version if d.entry else None, [v.version for v in d.routed])
        for d in board.deployments()
    }


def test_what_a_control_plane_reads_first_is_in_traffic_already() -> None:
    board = Switchboard(Clock())
    board.update([version(3)], in_traffic=True)
    assert entries(board) == {"p": (3, [3])}


def test_a_new_version_waits_for_its_hops_then_takes_traffic_and_the_old_one_drains() -> None:
    clock = Clock()
    board = Switchboard(clock)
    board.update([version(1)], in_traffic=True)
    board.update([version(2)])
    waiting = ["sidecar-b"]
    gateway_on_old = True
    assert not board.advance(lambda v: waiting, lambda pair: not gateway_on_old)
    assert entries(board) == {"p": (1, [1, 2])}  # both routed, the gateway still enters v1
    assert board.report("p")["waiting_for"] == ["sidecar-b"]

    waiting = []
    assert board.advance(lambda v: waiting, lambda pair: not gateway_on_old)
    assert entries(board) == {"p": (2, [1, 2])}  # v2 entered; v1 keeps its hops for requests in flight
    clock.now += 60
    assert not board.advance(lambda v: waiting, lambda pair: not gateway_on_old)  # the gateway has not switched yet
    gateway_on_old = False
    assert not board.advance(lambda v: waiting, lambda pair: not gateway_on_old)  # drain starts now
    clock.now += 2.0 + DRAIN_MARGIN - 0.01
    assert not board.advance(lambda v: waiting, lambda pair: True)
    clock.now += 0.02
    assert board.advance(lambda v: waiting, lambda pair: True)
    assert entries(board) == {"p": (2, [2])}


def test_a_pending_version_replaced_by_a_newer_one_goes_at_once() -> None:
    board = Switchboard(Clock())
    board.update([version(1)], in_traffic=True)
    board.update([version(2)])
    board.update([version(3)])
    board.advance(lambda v: ["x"], lambda pair: True)
    assert entries(board) == {"p": (1, [1, 3])}


def test_a_deleted_pipeline_stops_taking_requests_and_drains() -> None:
    clock = Clock()
    board = Switchboard(clock)
    board.update([version(4), version(1, name="other")], in_traffic=True)
    board.update([version(1, name="other")])
    assert entries(board)["p"] == (None, [4])
    board.advance(lambda v: [], lambda pair: True)
    clock.now += 2.0 + DRAIN_MARGIN + 0.01
    assert board.advance(lambda v: [], lambda pair: True)
    assert set(entries(board)) == {"other"}


def test_a_version_that_never_gets_ready_keeps_the_old_one_serving_and_is_reported() -> None:
    clock = Clock()
    board = Switchboard(clock)
    board.update([version(1)], in_traffic=True)
    board.update([version(2)])
    clock.now += SLOW_AFTER + 1
    board.advance(lambda v: [f"node-{i}" for i in range(30)], lambda pair: True)
    report = board.report("p")
    assert (report["entry"], report["pending"]) == (1, 2)
    assert report["pending_seconds"] > SLOW_AFTER
    assert len(report["waiting_for"]) == 21 and report["waiting_for"][-1] == "... 10 more"


def test_the_ledger_says_what_an_acknowledged_snapshot_routes() -> None:
    ledger = GroupLedger()
    ledger.record("s1", frozenset({("p", 1)}))
    ledger.record("s2", frozenset({("p", 1), ("p", 2)}))
    ledger.record("s3", frozenset({("p", 2)}))
    assert ledger.routes("s2", ("p", 2)) and not ledger.routes("s1", ("p", 2))
    assert ledger.routes("s3", ("p", 2)) and not ledger.routes("s3", ("p", 1))
    assert ledger.left("s3", ("p", 1)) and not ledger.left("s2", ("p", 1))
    assert not ledger.left("s3", ("p", 2))  # still carried
    assert (ledger.newest("s3", "p"), ledger.newest("s2", "p"), ledger.newest("unknown", "p")) == (2, 2, 0)
    for n in range(KEEP_VERSIONS + 1):  # endpoint churn: many snapshots with the same routes
        ledger.record(f"eds-{n}", frozenset({("p", 2)}))
    assert not ledger.routes("s1", ("p", 2))  # too old to know: it predates what is carried now
    assert ledger.routes(f"eds-{KEEP_VERSIONS}", ("p", 2))


def test_describe_says_what_a_pending_version_waits_for_and_what_drains() -> None:
    board = Switchboard(Clock())
    board.update([version(1)], in_traffic=True)
    board.update([version(2)])
    board.advance(lambda v: ["tokenize-v1-abc"], lambda pair: False)
    (note,) = board.notes("p")
    assert "version 2 is not in traffic yet" in note and "tokenize-v1-abc" in note and "version 1 serves" in note
    board.advance(lambda v: [], lambda pair: False)
    assert board.notes("p") == ["draining requests still on version 1"]
