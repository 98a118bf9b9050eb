"""Admission per caller key as the control plane reads it from runtimes: hostile answers refused whole, counts
merged over replicas and bounded per model version."""

from __future__ import annotations

import json

import pytest

from controlplane.admin.output import shown
from controlplane.monitoring.callers import MAX_KEYS, OTHER, merged, parse_answer, refused_text


@pytest.mark.parametrize(
    "answer",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'{"callers": []}',
        json.dumps({"callers": {f"k{i}": {"admitted": 1} for i in range(MAX_KEYS + 2)}}).encode(),
        json.dumps({"callers": {"": {"admitted": 1}}}).encode(),
        json.dumps({"callers": {"x" * 65: {"admitted": 1}}}).encode(),
        json.dumps({"callers": {"k": {"admitted": -1}}}).encode(),
        json.dumps({"callers": {"k": {"admitted": 1.5}}}).encode(),
        json.dumps({"callers": {"k": {"admitted": True}}}).encode(),
        json.dumps({"callers": {"k": {"x" * 33: 1}}}).encode(),
        json.dumps({"callers": {"k": {f"o{i}": 1 for i in range(9)}}}).encode(),
        json.dumps({"callers": {"k": [1]}}).encode(),
    ],
)
def test_an_answer_that_is_not_what_a_runtime_sends_is_refused_whole(answer: bytes) -> None:
    with pytest.raises(ValueError):
        parse_answer(answer)


def test_a_key_with_a_quote_or_a_line_break_is_kept_for_the_page_to_escape_and_the_terminal_to_quote() -> None:
    hostile = 'a"b\nc<script>\x1b[31m'
    assert parse_answer(json.dumps({"callers": {hostile: {"admitted": 2}}}).encode()) == {hostile: {"admitted": 2}}
    assert shown(hostile) == "'a\"b\\nc<script>\\x1b[31m'" and shown("gold tier") == "gold tier"


def test_replicas_add_up_per_version_and_a_version_shows_its_busiest_keys_by_name_and_folds_the_rest() -> None:
    one = {f"k{i:02}": {"admitted": 100 - i} for i in range(30)} | {OTHER: {"saturated": 5}}
    two = {f"k{i:02}": {"admitted": 100 - i, "over share": 1} for i in range(20, 40)}
    rows = merged([("m", "v1", one), ("m", "v1", two), ("n", "v2", {"solo": {"shed": 3}})])
    by = {(r.model, r.caller): r for r in rows}
    named = [r.caller for r in rows if r.model == "m" and r.caller != OTHER]
    assert len(named) == MAX_KEYS and len([r for r in rows if r.model == "m"]) == MAX_KEYS + 1
    assert by[("m", "k20")].admitted == 2 * 80 and by[("m", "k20")].refused == {"over share": 1}  # both replicas
    # kept by the most requests: k20..k29 (on both), k00..k19, then k30 and k31; k32..k39 are folded
    assert set(named) == {f"k{i:02}" for i in range(32)}, named
    folded = by[("m", OTHER)]
    assert folded.admitted == sum(100 - i for i in range(32, 40))
    assert folded.refused == {"saturated": 5, "over share": 8}
    assert by[("n", "solo")].admitted == 0 and by[("n", "solo")].refused == {"shed": 3}
    # the most refused first within a version; versions in name order
    assert rows[0].model == "m" and rows[0].caller == OTHER and rows[-1].caller == "solo"
    assert refused_text(folded.refused) == "8 over share, 5 saturated" and refused_text({}) == "-"
