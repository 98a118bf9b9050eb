"""Replay without the network: reading payload logs, judging answers, the trial's routes, the report's page."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from controlplane.delivery import replay_report
from controlplane.delivery.replay_report import (
    MAX_CHAINS,
    MAX_FIELDS,
    Answer,
    Recorded,
    Tally,
    chain_change,
    differences,
    passes,
    read_log,
)
from controlplane.delivery.replays import REPLAY_BASE, new_trial, trial_from
from controlplane.pipeline.model import RateLimit
from controlplane.translate.pipelines import RATE_FILTER, REPLAY, Deployment, carried, translate
from controlplane.web.dashboard import render_replays
from tests.helpers.translation import PIPELINE, RUNTIMES, at, entries, routes


def line(pipeline: str = "p", i: int = 0, **more: Any) -> str:
    record = {
        "at": f"2026-12-06T10:00:{i:02d}Z",
        "pipeline": pipeline,
        "version": "1",
        "request_id": f"r{i}",
        "status": 200,
        "latency_ms": 1.5,
        "served": ["a=m:v1"],
        "request": {"i": i},
        "response": {"y": i},
    }
    return json.dumps({**record, **more}) + "\n"


def test_numbers_within_tolerance_are_equal_and_every_differing_path_is_named() -> None:
    assert differences({"a": 1.0, "b": [1, 2]}, {"a": 1.0 + 1e-9, "b": [1, 2]}, 1e-6) == []
    assert differences({"a": 1.0}, {"a": 1.1}, 1e-6) == ["a"]
    assert differences({"a": {"b": [1, {"c": "x"}]}}, {"a": {"b": [1, {"c": "y"}]}}, 0) == ["a.b[1].c"]
    assert differences({"a": 1, "gone": 2}, {"a": 1, "new": 3}, 0) == ["gone", "new"]
    assert differences({"l": [1, 2]}, {"l": [1]}, 0) == ["l"]  # a length change is one difference
    assert differences({"f": True}, {"f": 1}, 0) == ["f"]  # a bool is not a number
    assert differences("text", "text", 0) == [] and differences("a", 1, 0) == ["(answer)"]


def test_chain_change_names_each_stage_served_by_another_version() -> None:
    recorded = ["a=ma:v1", "b=mb:v1", "c=mx:v1"]
    assert chain_change(recorded, "a=ma:v1, b=mb:v1, c=mx:v1") == "same models"
    assert chain_change(recorded, "a=ma:v1, b=mb:v2, c=mx:v1") == "b: mb:v1 -> mb:v2"
    assert chain_change(recorded, "a=ma:v1, b=mb:v1") == "c: mx:v1 -> -"  # a stage removed


def test_the_log_keeps_the_newest_records_and_counts_every_line_it_skips(tmp_path: Path) -> None:
    old, new = tmp_path / "p.jsonl.1", tmp_path / "p.jsonl"
    old.write_text("".join(line(i=i) for i in range(5)) + "\n\n")
    cut = line(i=20, request={"truncated": True, "bytes": 70_000, "head": "x"})
    new.write_text(
        line(i=10)
        + "garbage\n"
        + line("other", i=11)
        + cut
        + '{"status": "x", "pipeline": "p"}\n'
        + "[]\n"
        + line(i=12)
        + line(i=13, protocol="oip", request="\u0000binary tensors")
        + '{"pipeline": "p", "request": {"cut'
    )
    read = read_log([old, new], "p", last=3)
    assert [r.request_id for r in read.records] == ["r4", "r10", "r12"]  # oldest file first, newest kept
    assert read.skipped == {
        "older than --last": 4,
        "not JSON (corrupt or cut short)": 2,
        "another pipeline": 1,
        "request cut when logged (over 64 KiB)": 1,
        "not a record": 2,
        "binary OIP request (the log keeps it as text)": 1,
    }
    assert read.lines == 5 + 9  # blank lines are not lines
    since = read_log([old, new], "p", since="2026-12-06T10:00:03Z")
    assert [r.request_id for r in since.records] == ["r3", "r4", "r10", "r12"]


def test_a_line_over_the_limit_is_skipped_without_being_held(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(replay_report, "MAX_LINE", 200)
    path = tmp_path / "p.jsonl"
    path.write_text(line(i=1) + line(i=2, request={"big": "x" * 1000}) + line(i=3))
    read = read_log([path], "p")
    assert [r.request_id for r in read.records] == ["r1", "r3"] and read.skipped == {"over 200 bytes": 1}


def recorded(served: tuple[str, ...] = ("a=m:v1", "b=n:v1"), status: int = 200) -> Recorded:
    return Recorded("r", "", {"x": 1}, {"y": 1.0}, status, 2.0, served)


def test_answers_are_equal_changed_or_failed_and_tallied_per_chain() -> None:
    tally = Tally(1e-6)
    assert tally.judge(recorded(), Answer(200, {"y": 1.0}, "a=m:v1, b=n:v1", 1.0)) == "equal"
    assert tally.judge(recorded(), Answer(200, {"y": 2.0}, "a=m:v1, b=n:v2", 1.0)) == "changed"
    assert tally.judge(recorded(), Answer(422, {"y": 1.0}, "a=m:v1, b=n:v1", 1.0)) == "changed"  # status only
    assert tally.judge(recorded(), Answer(503, {}, "", 1.0)) == "failed"
    assert tally.judge(recorded(), Answer(None, None, "", 30_000.0, "timeout")) == "failed"
    assert tally.judge(recorded(status=500), Answer(500, {"y": 1.0}, "a=m:v1, b=n:v1", 1.0)) == "equal"  # as recorded
    report = tally.report()
    assert (report["requests"], report["equal"], report["changed"], report["failed"]) == (6, 2, 2, 2)
    assert report["failed_by"] == {"status 503": 1, "timeout": 1}
    assert report["changed_fields"] == {"y": 1, "(status)": 1}
    chains = {c["chain"]: c for c in report["by_chain"]}
    assert chains["b: n:v1 -> n:v2"]["changed_share"] == 1.0
    assert chains["(no answer)"]["failed"] == 2  # no answer, or one that names no chain
    assert report["latency_ms"]["candidate"]["p99"] == 1.0 and report["latency_ms"]["recorded"]["p50"] == 2.0
    assert passes(report, 1.0, 0.5) and not passes(report, 0.2, 1.0) and not passes(Tally(0).report(), 1, 1)


def test_chains_fields_and_examples_are_bounded() -> None:
    tally = Tally(0)
    for i in range(max(MAX_CHAINS, MAX_FIELDS) + 20):
        rec = Recorded("r", "", {}, {f"f{i}": i}, 200, 1.0, (f"s{i}=m:v1",))
        tally.judge(rec, Answer(200, {f"f{i}": -1}, f"s{i}=m:v2", 1.0))
    report = tally.report()
    assert len(report["by_chain"]) == MAX_CHAINS + 1 and report["by_chain"][0]["chain"] == "(other chains)"
    assert len(report["changed_fields"]) == MAX_FIELDS + 1 and report["changed_fields"]["(other fields)"] == 20
    assert len(report["examples"]) == replay_report.MAX_EXAMPLES


def test_a_trial_is_entered_only_with_its_secret_never_logged_and_not_held_to_the_callers_rate_limit() -> None:
    logged = dataclasses.replace(PIPELINE, log_percent=50, rate_limit=RateLimit(per_second=5, burst=5))
    trial = new_trial(dataclasses.replace(PIPELINE, log_percent=0), ttl=60, now=1000.0)
    assert trial.version.version >= REPLAY_BASE and trial_from(json.loads(json.dumps(trial.record()))) == trial
    deployments = [Deployment(at(logged), (at(logged),), ((trial.version, trial.secret),))]
    snapshots = translate(deployments, RUNTIMES)
    entry = [r for r in entries(snapshots["gateway"]) if r.match.path == "/pipelines/p"]
    first, live = entry[0], entry[-1]
    assert [(m.name, m.string_match.exact) for m in first.match.headers] == [(REPLAY, trial.secret)]
    assert first.route.prefix_rewrite == f"/pipelines/p/v{trial.version.version}/a" and first.name == "p/replay/a"
    assert "x-mll-log" not in [a.header.key for a in first.request_headers_to_add]  # a replay feeds no log
    assert REPLAY in first.request_headers_to_remove and REPLAY in live.request_headers_to_remove
    assert not live.match.headers and "x-mll-log" in [a.header.key for a in live.request_headers_to_add]
    assert RATE_FILTER in live.typed_per_filter_config and RATE_FILTER not in first.typed_per_filter_config
    # The sidecars get the trial's hops beside the live ones; the gateway counts as routing it.
    assert any(f"/v{trial.version.version}/b" in r.match.path for r in routes(snapshots["ma-v1-1"], "egress"))
    assert ("p", trial.version.version) in carried(deployments, RUNTIMES)["gateway"]


def test_an_expired_or_out_of_range_trial_is_told_apart() -> None:
    trial = new_trial(PIPELINE, ttl=1, now=1000.0)
    assert trial.live(1005.0) and not trial.live(1010.0)  # at least 10 s
    with pytest.raises(ValueError, match="out of range"):
        trial_from({**trial.record(), "number": 5})
    assert new_trial(PIPELINE, ttl=10**9, now=0).expires_at == 3600


def test_the_page_escapes_a_hostile_report() -> None:
    hostile = {
        "id": "<script>x</script>",
        "requests": "<b>",
        "equal_share": "9" * 50,
        "changed_share": None,
        "by_chain": [{"chain": "<img src=x>", "requests": 1, "equal_share": 1.0}, "not a dict"],
        "latency_ms": ["nope"],
    }
    page = render_replays([hostile, {}], running="<r>")
    assert "<script>" not in page and "<img" not in page and "&lt;r&gt;" in page and "100.0%" in page
