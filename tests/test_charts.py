"""The pipeline drawn and its traffic charted, on plain data (the browser test is in test_stack_e2e)."""

from __future__ import annotations

import itertools
import re

from controlplane.delivery.traffic import ClusterStats, VariantTraffic
from controlplane.pipeline.spec import parse_pipeline
from controlplane.web.charts import line_chart, mark_groups, pipeline_svg, rate_series

PIPELINE = parse_pipeline(
    {
        "name": "p",
        "stages": [
            {
                "name": "a",
                "variants": [{"model": "ma", "version": "v1", "weight": 3}, {"model": "ma", "version": "v2"}],
                "shadow": {"model": "ma", "version": "v3", "percent": 5},
            },
            {"name": "b", "branch_on": "k", "branches": [{"key": "x", "variants": [{"model": "mx", "version": "v1"}]}]},
        ],
    }
)


def test_the_graph_draws_every_variant_with_its_weight_its_share_its_health_and_the_shadow() -> None:
    row = VariantTraffic("p", "a", "", "ma", "v2", 0.25, 0.3, 30, 0, None, None, 0, 60.0)
    svg = pipeline_svg(PIPELINE, [row], {"ma.v1": (2, 2), "ma.v2": (0, 1)})
    drawn = re.findall(
        r"<g class='variant (\w+)' data-group='([^']*)' data-variant='([^']+)' data-weight='([\d.]+)' "
        r"data-seen='([\d.]*)'",
        svg,
    )
    assert drawn == [
        ("passing", "", "ma:v1", "0.7500", ""),
        ("failing", "", "ma:v2", "0.2500", "0.3000"),  # registered, none passing
        ("pending", "x", "mx:v1", "1.0000", ""),  # no runtime registered at all
    ]
    assert "25% set · seen 30.0% · 0/1 passing" in svg  # the colour is said in words too
    assert "shadow: ma:v3 5%" in svg and "class='shadow'" in svg
    assert svg.count("marker-end") == 1  # one arrow between the two stages
    assert "role='img' aria-label=" in svg


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


def test_a_chart_draws_a_line_per_series_with_units_and_values_on_hover_and_marks_changes() -> None:
    svg = line_chart("requests", {"ma.v1": [(10.0, 1.0), (20.0, 3.0)], "ma.v2": []}, 0.0, 60.0, [(30.0, "v2")], "req/s")
    assert svg.count("<polyline") == 1 and "data-series='ma.v1'" in svg
    assert "<title>ma.v1: 3 req/s, 40 s ago</title>" in svg  # each point's value, unit and age on hover
    assert ">3.45 req/s</text>" in svg and ">now</text>" in svg and ">-60 s</text>" in svg  # axes with units
    assert "<li>1: v2 <span class='muted'>(30 s ago)</span></li>" in svg  # the mark's label under the chart
    assert "class='mark'" not in line_chart("x", {}, 0.0, 60.0, [(90.0, "later")])  # outside the span: not drawn
    ratio = line_chart("5xx", {"a": [(10.0, 0.25)]}, 0.0, 60.0, unit="%")
    assert "a: 25%, 50 s ago" in ratio


def test_marks_never_overlap_however_close_in_time() -> None:
    """Eight versions written within a second, then one a while later: one badge "1-8", then "9"; no two
    badges share a pixel, and every label is listed under the chart."""
    marks = [(30.0 + i / 10, f"v{i + 2} rollout step {i}") for i in range(8)] + [(55.0, "v10 apply")]
    svg = line_chart("x", {}, 0.0, 60.0, marks)
    badges = re.findall(r"<rect x='([\d.]+)' y='14' width='(\d+)' height='14' rx='3'/><text [^>]+>([\d-]+)</text>", svg)
    assert [b[2] for b in badges] == ["1-8", "9"]
    spans = sorted((float(x), float(x) + int(w)) for x, w, _ in badges)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))
    assert svg.count("<li>") == 9 and "9: v10 apply" in svg
    # The grouping itself: every mark under the badge before it joins it, the next badge starts past it.
    xs = [0.0, 5.0, 40.0, 41.0, 100.0]
    assert mark_groups(xs, lambda a, b: 20) == [(0, 1), (2, 3), (4, 4)]
    assert mark_groups([float(i) for i in range(100)], lambda a, b: 30) == [(0, 32), (33, 65), (66, 98), (99, 99)]


def test_a_model_versions_charts_mark_each_pipeline_version_that_sent_to_it_or_stopped() -> None:
    from controlplane.pipeline.model import PipelineVersion
    from controlplane.web.monitoring import version_changes

    def version(n: int, models: list[str], at: str) -> PipelineVersion:
        stages = [{"name": "s", "variants": [{"model": "ma", "version": v} for v in models]}]
        return PipelineVersion(parse_pipeline({"name": "p", "stages": stages}), n, at, f"cause {n}")

    history = {
        "p": [
            version(1, ["v1"], "2026-12-06T10:00:00Z"),
            version(2, ["v1", "v2"], "2026-12-06T10:05:00Z"),
            version(3, ["v2"], "2026-12-06T10:06:00Z"),
            version(4, ["v2"], "not a time"),
        ]
    }
    changes = version_changes(history)
    assert [label for _, label in changes["ma.v1"]] == ["p v1 cause 1", "p v2 cause 2", "p v3 cause 3"]
    assert [label for _, label in changes["ma.v2"]] == ["p v2 cause 2", "p v3 cause 3"]
    assert changes["ma.v2"][0][0] - changes["ma.v1"][0][0] == 300
