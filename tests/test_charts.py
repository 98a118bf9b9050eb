"""The pipeline drawn and its traffic charted, on plain data (the browser test is in test_stack_e2e)."""

from __future__ import annotations

import re

from controlplane.delivery.traffic import ClusterStats, VariantTraffic
from controlplane.pipeline.spec import parse_pipeline
from controlplane.web.charts import line_chart, pipeline_svg, rate_series

PIPELINE = parse_pipeline({
    "name": "p",
    "stages": [
        {"name": "a", "variants": [{"model": "ma", "version": "v1", "weight": 3}, {"model": "ma", "version": "v2"}],
         "shadow": {"model": "ma", "version": "v3", "percent": 5}},
        {"name": "b", "branch_on": "k", "branches": [{"key": "x", "variants": [{"model": "mx", "version": "v1"}]}]},
    ],
})  # fmt: skip


def test_the_graph_draws_every_variant_with_its_weight_its_share_and_the_shadow() -> None:
    row = VariantTraffic("p", "a", "", "ma", "v2", 0.25, 0.3, 30, 0, None, None, 0, 60.0)
    svg = pipeline_svg(PIPELINE, [row])
    drawn = re.findall(r"data-group='([^']*)' data-variant='([^']+)' data-weight='([\d.]+)' data-seen='([\d.]*)'", svg)
    assert drawn == [("", "ma:v1", "0.7500", ""), ("", "ma:v2", "0.2500", "0.3000"), ("x", "mx:v1", "1.0000", "")]
    assert "ma:v2 25% (seen 30.0%)" in svg
    assert "shadow: ma:v3 5%" in svg and "stroke-dasharray" in svg
    assert svg.count("marker-end") == 1  # one arrow between the two stages


def test_rates_come_from_consecutive_readings_and_a_restarted_envoy_counts_from_zero() -> None:
    readings = [
        (100.0, {"ma.v1": ClusterStats(100, 0)}),
        (105.0, {"ma.v1": ClusterStats(150, 5)}),
        (110.0, {"ma.v1": ClusterStats(10, 0)}),  # restarted: less than before, counted as nothing new
    ]
    rps, errors, _ = rate_series(readings, ["ma.v1", "ma.v2"], since=0)
    assert rps["ma.v1"] == [(105.0, 10.0), (110.0, 0.0)] and errors["ma.v1"] == [(105.0, 0.1), (110.0, 0.0)]
    assert rps["ma.v2"] == [(105.0, 0.0), (110.0, 0.0)]
    assert rate_series(readings, ["ma.v1"], since=104)[0]["ma.v1"] == [(110.0, 0.0)]


def test_a_chart_draws_a_line_per_series_and_marks_when_a_version_entered() -> None:
    svg = line_chart("requests/s", {"ma.v1": [(10.0, 1.0), (20.0, 3.0)], "ma.v2": []}, 0.0, 60.0, [(30.0, "v2")])
    assert svg.count("<polyline") == 1 and "data-series='ma.v1'" in svg
    assert "class='mark'" in svg and ">v2<" in svg and "last 60 s" in svg
    assert "class='mark'" not in line_chart("x", {}, 0.0, 60.0, [(90.0, "later")])  # outside the span: not drawn


def test_marks_close_in_time_print_their_labels_on_rows_of_their_own() -> None:
    marks = [(30.0 + i, f"v{i} rollout step {i}") for i in range(3)] + [(55.0, "v9 apply")]
    svg = line_chart("x", {}, 0.0, 60.0, marks)
    rows = [int(y) for y in re.findall(r"<text x='[\d.]+' y='(\d+)' fill='#555' text-anchor='end'", svg)]
    assert rows[:3] == [22, 34, 46]  # a second apart: one below the other
    assert rows[3] == 22  # far enough to the right: back on the first row


def test_a_model_versions_charts_mark_each_pipeline_version_that_sent_to_it_or_stopped() -> None:
    from controlplane.pipeline.model import PipelineVersion
    from controlplane.web.monitoring import version_changes

    def version(n: int, models: list[str], at: str) -> PipelineVersion:
        stages = [{"name": "s", "variants": [{"model": "ma", "version": v} for v in models]}]
        return PipelineVersion(parse_pipeline({"name": "p", "stages": stages}), n, at, f"cause {n}")

    history = {"p": [version(1, ["v1"], "2026-12-06T10:00:00Z"), version(2, ["v1", "v2"], "2026-12-06T10:05:00Z"),
                     version(3, ["v2"], "2026-12-06T10:06:00Z"), version(4, ["v2"], "not a time")]}  # fmt: skip
    changes = version_changes(history)
    assert [label for _, label in changes["ma.v1"]] == ["p v1 cause 1", "p v2 cause 2", "p v3 cause 3"]
    assert [label for _, label in changes["ma.v2"]] == ["p v2 cause 2", "p v3 cause 3"]
    assert changes["ma.v2"][0][0] - changes["ma.v1"][0][0] == 300
