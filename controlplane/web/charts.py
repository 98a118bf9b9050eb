"""The pipeline drawn, and its traffic over time, as server-rendered SVG. Pure: no I/O, no JavaScript.

`pipeline_svg` draws a column per stage: each split group (the stage, a branch,
an ensemble member, a join) with its variants, their configured weight, the
share observed over the window and their replicas' health; shadows dashed; a
rollout's step. `rate_series` turns the control plane's periodic readings of
every Envoy's counters (TrafficHistory, one every 5 s, an hour kept) into
requests/s and 5xx ratio per model version, and `line_chart` draws them with
units, values on hover and numbered marks for changes.

Why SVG from the server and not a charting library in the browser: the readings are on the server already, a
page needs no script to show its numbers (the hover values are SVG titles), the drawing is a pure function the
tests read, and the colours come from the one stylesheet so light and dark need nothing more.
"""

from __future__ import annotations

import html
import itertools
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from controlplane.delivery.rollouts import state
from controlplane.delivery.traffic import ClusterStats, VariantTraffic, delta
from controlplane.pipeline.model import Pipeline

SERIES_CLASSES = 8  # s1..s8 in mllambda.css: a colour per series that reads in light and dark
STAGE_W, ROW_H, GAP = 270, 48, 36
Readings = Sequence[tuple[float, Mapping[str, ClusterStats]]]
Series = dict[str, list[tuple[float, float]]]  # label -> (time, value)
Health = Mapping[str, tuple[int, int]]  # cluster -> (replicas passing, registered)


def percent(value: float | None) -> str:
    """A share (0..1) as a percent with one decimal; "-" for none."""
    return "-" if value is None else f"{100 * value:.1f}%"


def health_word(passing: int, registered: int) -> str:
    """A variant's state in one word, the same word as its colour's class: passing, failing or pending."""
    return "passing" if passing else "failing" if registered else "pending"


def pipeline_svg(p: Pipeline, rows: Sequence[VariantTraffic], health: Health) -> str:
    """Stages left to right; in each, its groups and variants: configured weight, observed share (the bar),
    replicas passing (the colour and the words), shadows dashed, a rollout's step."""
    observed = {(r.stage, r.branch, r.model, r.version): r.observed_share for r in rows}
    e = html.escape
    columns, tallest = [], 0
    for k, stage in enumerate(p.stages):
        x = 10 + k * (STAGE_W + GAP)
        lines = [f"<text x='{x + 8}' y='22' font-weight='bold'>{e(stage.name)}</text>"]
        y = 46
        for key, variants in stage.groups():
            if key:
                lines.append(f"<text x='{x + 8}' y='{y}' font-style='italic' class='dim'>{e(key)}</text>")
                y += 18
            total = sum(v.weight for v in variants) or 1
            for v in variants:
                seen = observed.get((stage.name, key, v.model, v.version))
                passing, registered = health.get(v.cluster, (0, 0))
                word = health_word(passing, registered)
                share = v.weight / total
                data = f"data-variant='{e(v.model)}:{e(v.version)}' data-weight='{share:.4f}'"
                data += f" data-seen='{'' if seen is None else f'{seen:.4f}'}' data-health='{word}'"
                about = f"{100 * share:.0f}% set · seen {percent(seen)} · {passing}/{registered} passing"
                bar = (STAGE_W - 28) * min(max(seen or 0.0, 0.0), 1.0)
                lines.append(
                    f"<g class='variant {word}' data-group='{e(key)}' {data}>"
                    f"<title>{e(v.model)}:{e(v.version)}: {e(about)}</title>"
                    f"<rect x='{x + 8}' y='{y - 14}' width='{STAGE_W - 16}' height='{ROW_H - 4}' rx='5'/>"
                    f"<rect class='bar' x='{x + 14}' y='{y + 23}' width='{bar:.1f}' height='5' rx='2'/>"
                    f"<text x='{x + 14}' y='{y + 2}'>{e(v.model)}:{e(v.version)}</text>"
                    f"<text x='{x + 14}' y='{y + 18}' font-size='11'>{e(about)}</text></g>"
                )
                y += ROW_H
        for member, s in stage.shadows():
            about = f"shadow{' of ' + member if member else ''}: {s.model}:{s.version} {s.percent:g}%"
            lines.append(
                f"<g class='shadow'><rect x='{x + 8}' y='{y - 14}' width='{STAGE_W - 16}' height='22' rx='5'/>"
                f"<text x='{x + 14}' y='{y + 2}' class='dim'>{e(about)}</text></g>"
            )
            y += 28
        for key, r in [("", stage.rollout), *((b.key, b.rollout) for b in stage.branches)]:
            if r is not None:
                where = f" ({key})" if key else ""
                text = f"rollout{where} to {r.candidate.model}:{r.candidate.version}: {state(r)}"
                lines.append(f"<text class='rollout' x='{x + 8}' y='{y}'>{e(text)}</text>")
                y += 20
        tallest = max(tallest, y)
        columns.append((x, lines))
    parts = []
    for k, (x, lines) in enumerate(columns):
        parts.append(f"<rect class='frame' x='{x}' y='4' width='{STAGE_W}' height='{tallest}' rx='8'/>")
        parts += lines
        if k + 1 < len(columns):
            mid = 4 + tallest // 2
            parts.append(f"<path class='arrow' d='M{x + STAGE_W} {mid} h{GAP - 8}' marker-end='url(#arrow)'/>")
    width, height = 20 + len(columns) * (STAGE_W + GAP), tallest + 24
    arrow = (
        "<defs><marker id='arrow' markerWidth='8' markerHeight='8' refX='6' refY='3' orient='auto'>"
        "<path class='arrow' d='M0,0 L6,3 L0,6 z'/></marker></defs>"
    )
    caption = f"<text x='10' y='{height - 4}' class='dim'>transport: {e(p.transport)}</text>"
    summary = f"the stages of pipeline {p.name}, left to right, each variant with its share"
    return (
        f"<svg class='pipeline' role='img' aria-label='{e(summary)}' xmlns='http://www.w3.org/2000/svg' "
        f"width='{width}' height='{height}' viewBox='0 0 {width} {height}' font-family='sans-serif' "
        f"font-size='13'>{arrow}{''.join(parts)}{caption}</svg>"
    )


def rate_series(readings: Readings, clusters: Sequence[str], since: float) -> tuple[Series, Series, Series]:
    """Requests/s and 5xx ratio per cluster between consecutive readings taken after `since`, and the p99
    (ms) of each reading's last Envoy stats interval."""
    rps: Series = {c: [] for c in clusters}
    errors: Series = {c: [] for c in clusters}
    p99: Series = {c: [] for c in clusters}
    kept = [(at, stats) for at, stats in readings if at >= since]  # one every 5 s: at most an hour's
    for (before, old), (at, new) in itertools.pairwise(kept):
        seconds = at - before
        if seconds <= 0:
            continue
        moved = delta(new, old)
        for c in clusters:
            got = moved.get(c, ClusterStats())
            rps[c].append((at, got.requests / seconds))
            errors[c].append((at, got.errors / got.requests if got.requests else 0.0))
            if got.requests and got.p99_recent_ms is not None:
                p99[c].append((at, got.p99_recent_ms))
    return rps, errors, p99


def wall_time(iso: str) -> float | None:
    """A record's `created_at` (ISO 8601, Z) as a Unix time; None if it does not parse."""
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def value_text(value: float, unit: str) -> str:
    """A value with its unit as the charts say it: "12.5 req/s", "3.2%" (a ratio), "85 ms", "0.12"."""
    if unit == "%":
        return f"{100 * value:.3g}%"
    return f"{value:.3g}" + (f" {unit}" if unit else "")


def _ticks(span: float) -> list[float]:
    """Seconds before the end at which the time axis is labelled: 3 to 6 round steps over the span."""
    step = next((s for s in (10, 30, 60, 120, 300, 600, 900, 1800) if span / s <= 6), 3600)
    return [k * step for k in range(int(span // step) + 1)]


def mark_groups(xs: Sequence[float], width_of: Callable[[int, int], float], gap: float = 3) -> list[tuple[int, int]]:
    """Marks at pixel positions `xs` (sorted) grouped so that their badges never overlap: a mark joins the group
    before it while it falls under that group's badge (as wide as its label "first-last" needs). Returns each
    group as (first index, last index); a group's badge starts at its first mark and ends before the next's."""
    groups: list[tuple[int, int]] = []
    for i, x in enumerate(xs):
        if groups:
            first, _ = groups[-1]
            if x < xs[first] + width_of(first, i) + gap:
                groups[-1] = (first, i)
                continue
        groups.append((i, i))
    return groups


def line_chart(
    title: str,
    series: Series,
    start: float,
    end: float,
    marks: Sequence[tuple[float, str]] = (),
    unit: str = "",
) -> str:
    """One SVG chart and its marks' list: a line per series over [start, end] (each point's value, with its
    unit and age, on hover), the time axis in minutes before now, and numbered marks for changes (a version
    written, a version entering traffic) listed under the chart, so that no two labels ever print over each
    other however close in time they are."""
    width, height, left, bottom, legend = 820, 200, 64, 30, 190
    top = 1.15 * max([v for points in series.values() for _, v in points] + [0.0]) or 1.0  # headroom
    span = max(end - start, 1e-9)

    def x(t: float) -> float:
        return left + (t - start) / span * (width - left - legend)

    def y(v: float) -> float:
        return 16 + (1 - v / top) * (height - bottom - 16)

    e = html.escape
    base = height - bottom
    parts = [f"<text x='{left}' y='11' font-weight='bold'>{e(title)}</text>"]
    for v in (0.0, top / 2, top):
        parts.append(f"<line class='grid' x1='{left}' y1='{y(v):.1f}' x2='{width - legend}' y2='{y(v):.1f}'/>")
        parts.append(
            f"<text x='{left - 6}' y='{y(v) + 4:.1f}' text-anchor='end' class='dim'>{value_text(v, unit)}</text>"
        )
    parts.append(f"<line class='axis' x1='{left}' y1='{base}' x2='{width - legend}' y2='{base}'/>")
    for ago in _ticks(span):
        at = x(end - ago)
        words = "now" if ago == 0 else f"-{_duration(ago)}"
        parts.append(f"<text x='{at:.1f}' y='{base + 16}' text-anchor='middle' class='dim'>{words}</text>")
    shown = sorted(m for m in marks if start <= m[0] <= end)
    xs = [x(t) for t, _ in shown]

    def badge(first: int, last: int) -> str:
        return str(first + 1) if first == last else f"{first + 1}-{last + 1}"

    for first, last in mark_groups(xs, lambda a, b: 7 * len(badge(a, b)) + 8):
        text, w = badge(first, last), 7 * len(badge(first, last)) + 8
        about = "; ".join(f"{i + 1}: {shown[i][1]}" for i in range(first, last + 1))
        parts.append(
            f"<g class='mark'><title>{e(about)}</title><line x1='{xs[first]:.1f}' y1='16' x2='{xs[first]:.1f}' "
            f"y2='{base}'/><rect x='{xs[first]:.1f}' y='14' width='{w}' height='14' rx='3'/>"
            f"<text x='{xs[first] + 4:.1f}' y='25' font-size='10'>{text}</text></g>"
        )
    listed = [
        f"<li>{i + 1}: {e(label)} <span class='muted'>({_duration(end - t)} ago)</span></li>"
        for i, (t, label) in enumerate(shown)
    ]
    for i, (label, points) in enumerate(sorted(series.items())):
        kind = f"s{i % SERIES_CLASSES + 1}"
        if points:
            path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
            parts.append(f"<polyline class='{kind}' data-series='{e(label)}' points='{path}'/>")
            parts += [
                f"<circle class='{kind}' cx='{x(t):.1f}' cy='{y(v):.1f}' r='2.5'><title>{e(label)}: "
                f"{value_text(v, unit)}, {_duration(end - t)} ago</title></circle>"
                for t, v in points[-120:]
            ]
        ly = 24 + 16 * i
        parts.append(f"<rect class='{kind}' x='{width - legend + 10}' y='{ly - 9}' width='10' height='10'/>")
        parts.append(f"<text x='{width - legend + 26}' y='{ly}'>{e(label)}</text>")
    svg = (
        f"<svg class='chart' role='img' aria-label='{e(title)} over the last {_duration(span)}' "
        f"xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
        f"font-family='sans-serif' font-size='11'>{''.join(parts)}</svg>"
    )
    return svg + (f"<ul class='marks'>{''.join(listed)}</ul>" if listed else "")


def distribution_svg(title: str, labels: Sequence[str], baseline: Sequence[float], current: Sequence[float]) -> str:
    """Two distributions over the same bins, side by side per bin: the baseline (grey) and now (blue). Bin labels
    are slanted so that many bins never print over each other; each bar says its bin and share on hover."""
    width, height, left, bottom = 520, 180, 40, 70
    n = max(len(labels), 1)
    slot = (width - left) / n
    most = max([*baseline, *current, 0.01])
    top = most * 1.1
    e = html.escape

    def y(value: float) -> float:
        return height - bottom - (height - bottom - 14) * value / top

    def bar(i: int, value: float, offset: float, series: str) -> str:
        return (
            f"<rect class='{series}' data-series='{series}' x='{left + i * slot + offset:.1f}' "
            f"y='{y(value):.1f}' width='{slot * 0.4:.1f}' height='{height - bottom - y(value):.1f}'><title>"
            f"{series} {e(labels[i])}: {value:.1%}</title></rect>"
        )

    parts = [
        f"<text x='{left}' y='10' font-weight='bold'>{e(title)}</text>",
        f"<line class='grid' x1='{left}' y1='{y(most):.1f}' x2='{width}' y2='{y(most):.1f}'/>",
        f"<text x='{left - 4}' y='{y(most) + 4:.1f}' text-anchor='end' class='dim'>{most:.0%}</text>",
        f"<text x='{left - 4}' y='{height - bottom}' text-anchor='end' class='dim'>0%</text>",
        f"<rect class='baseline' x='{width - 170}' y='2' width='10' height='10'/>",
        f"<text x='{width - 156}' y='11'>baseline</text>",
        f"<rect class='now' x='{width - 90}' y='2' width='10' height='10'/>",
        f"<text x='{width - 76}' y='11'>now</text>",
    ]
    for i, label in enumerate(labels):
        parts.append(bar(i, baseline[i], slot * 0.1, "baseline"))
        parts.append(bar(i, current[i], slot * 0.5, "now"))
        lx, ly = left + i * slot + slot / 2, height - bottom + 10
        parts.append(
            f"<text x='{lx:.1f}' y='{ly}' text-anchor='end' font-size='9' transform='rotate(-40 {lx:.1f} "
            f"{ly})'>{e(label[:14])}</text>"
        )
    return (
        f"<svg class='distribution' role='img' aria-label='{e(title)}: share of values per bin, baseline and now' "
        f"xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
        f"font-family='sans-serif' font-size='11'>{''.join(parts)}</svg>"
    )
