"""The pipeline drawn, and its traffic over time, as server-rendered SVG. Pure: no I/O, no JavaScript.

`pipeline_svg` draws a column per stage: each split group (the stage, a branch,
an ensemble member, a join) with its variants, their configured weight and the
share observed over the window; shadows dashed. `rate_series` turns the
control plane's periodic readings of every Envoy's counters (TrafficHistory,
one every 5 s, an hour kept) into requests/s and 5xx ratio per model version,
and `line_chart` draws them, with the moment the current version entered marked.
"""

from __future__ import annotations

import html
import itertools
from collections.abc import Mapping, Sequence
from datetime import datetime

from controlplane.delivery.traffic import ClusterStats, VariantTraffic, delta
from controlplane.pipeline.model import Pipeline

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
STAGE_W, ROW_H, GAP = 240, 22, 40
Readings = Sequence[tuple[float, Mapping[str, ClusterStats]]]
Series = dict[str, list[tuple[float, float]]]  # label -> (time, value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def pipeline_svg(p: Pipeline, rows: Sequence[VariantTraffic]) -> str:
    """Stages left to right; in each, its groups and variants: configured weight, observed share."""
    observed = {(r.stage, r.branch, r.model, r.version): r.observed_share for r in rows}
    e = html.escape
    columns, tallest = [], 0
    for k, stage in enumerate(p.stages):
        x = 10 + k * (STAGE_W + GAP)
        lines = [f"<text x='{x + 6}' y='20' font-weight='bold'>{e(stage.name)}</text>"]
        y = 40
        for key, variants in stage.groups():
            if key:
                lines.append(f"<text x='{x + 6}' y='{y}' font-style='italic'>{e(key)}</text>")
                y += ROW_H
            total = sum(v.weight for v in variants) or 1
            for v in variants:
                seen = observed.get((stage.name, key, v.model, v.version))
                label = f"{v.model}:{v.version} {100 * v.weight / total:.0f}% (seen {_pct(seen)})"
                data = f"data-variant='{e(v.model)}:{e(v.version)}' data-weight='{v.weight / total:.4f}'"
                data += f" data-seen='{'' if seen is None else f'{seen:.4f}'}'"
                lines.append(
                    f"<g class='variant' data-group='{e(key)}' {data}>"
                    f"<rect x='{x + 4}' y='{y - 15}' width='{STAGE_W - 8}' height='{ROW_H - 2}' rx='4' fill='#eef3fb' "
                    f"stroke='#1f77b4'/><text x='{x + 10}' y='{y}'>{e(label)}</text></g>"
                )
                y += ROW_H
        for member, s in stage.shadows():
            about = f"shadow{' of ' + member if member else ''}: {s.model}:{s.version} {s.percent:g}%"
            lines.append(
                f"<rect x='{x + 4}' y='{y - 15}' width='{STAGE_W - 8}' height='{ROW_H - 2}' rx='4' fill='none' "
                f"stroke='#888' stroke-dasharray='4 3'/><text x='{x + 10}' y='{y}' fill='#555'>{e(about)}</text>"
            )
            y += ROW_H
        tallest = max(tallest, y)
        columns.append((x, lines))
    parts = []
    for k, (x, lines) in enumerate(columns):
        parts.append(f"<rect x='{x}' y='4' width='{STAGE_W}' height='{tallest}' rx='6' fill='none' stroke='#999'/>")
        parts += lines
        if k + 1 < len(columns):
            mid = 4 + tallest // 2
            parts.append(f"<path d='M{x + STAGE_W} {mid} h{GAP - 6}' stroke='#333' marker-end='url(#arrow)'/>")
    width, height = 20 + len(columns) * (STAGE_W + GAP), tallest + 24
    arrow = (
        "<defs><marker id='arrow' markerWidth='8' markerHeight='8' refX='6' refY='3' orient='auto'>"
        "<path d='M0,0 L6,3 L0,6 z' fill='#333'/></marker></defs>"
    )
    caption = f"<text x='10' y='{height - 4}' fill='#555'>transport: {e(p.transport)}</text>"
    return (
        f"<svg class='pipeline' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"font-family='sans-serif' font-size='12'>{arrow}{''.join(parts)}{caption}</svg>"
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


MARK_ROWS = 4  # rows of mark labels, so that marks close in time do not print over each other


def line_chart(title: str, series: Series, start: float, end: float, marks: Sequence[tuple[float, str]] = ()) -> str:
    """One SVG chart: a line per series over [start, end], vertical marks (e.g. a version entering)."""
    width, height, left, bottom, legend = 760, 180, 48, 24, 170
    top = 1.15 * max([v for points in series.values() for _, v in points] + [0.0]) or 1.0  # headroom
    span = max(end - start, 1e-9)

    def x(t: float) -> float:
        return left + (t - start) / span * (width - left - legend)

    def y(v: float) -> float:
        return 10 + (1 - v / top) * (height - bottom - 10)

    e = html.escape
    parts = [
        f"<text x='{left}' y='10' font-weight='bold'>{e(title)}</text>",
        f"<line x1='{left}' y1='{height - bottom}' x2='{width - legend}' y2='{height - bottom}' stroke='#999'/>",
        f"<text x='2' y='{y(top) + 4:.0f}'>{top:.3g}</text><text x='2' y='{height - bottom}'>0</text>",
        f"<text x='{left}' y='{height - 6}' fill='#555'>last {_duration(span)}</text>",
    ]
    rows = [float("-inf")] * MARK_ROWS  # where each row of mark labels ends, left to right
    for t, label in sorted(m for m in marks if start <= m[0] <= end):
        right = x(t) - 3  # a label ends at its line; about 6 px a character
        row = next((i for i, used in enumerate(rows) if used < right - 6 * len(label) - 4), rows.index(min(rows)))
        rows[row] = right
        parts.append(
            f"<line class='mark' x1='{x(t):.1f}' y1='12' x2='{x(t):.1f}' y2='{height - bottom}' "
            f"stroke='#999' stroke-dasharray='3 3'/><text x='{right:.1f}' y='{22 + 12 * row}' fill='#555' "
            f"text-anchor='end'>{e(label)}</text>"
        )
    for i, (label, points) in enumerate(sorted(series.items())):
        color = COLORS[i % len(COLORS)]
        if points:
            path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
            parts.append(f"<polyline data-series='{e(label)}' fill='none' stroke='{color}' points='{path}'/>")
            parts += [f"<circle cx='{x(t):.1f}' cy='{y(v):.1f}' r='2' fill='{color}'/>" for t, v in points[-120:]]
        parts.append(f"<text x='{width - legend + 10}' y='{24 + 14 * i}' fill='{color}'>{e(label)}</text>")
    return (
        f"<svg class='chart' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"font-family='sans-serif' font-size='11'>{''.join(parts)}</svg>"
    )


def distribution_svg(title: str, labels: Sequence[str], baseline: Sequence[float], current: Sequence[float]) -> str:
    """Two distributions over the same bins, side by side per bin: the baseline (grey) and now (blue)."""
    width, height, left, bottom = 520, 150, 36, 40
    n = max(len(labels), 1)
    slot = (width - left) / n
    top = max([*baseline, *current, 0.01]) * 1.1

    def bar(i: int, value: float, offset: float, color: str, series: str) -> str:
        h = (height - bottom - 14) * value / top
        return (f"<rect data-series='{series}' x='{left + i * slot + offset:.1f}' y='{height - bottom - h:.1f}' "
                f"width='{slot * 0.4:.1f}' height='{h:.1f}' fill='{color}'><title>{series} "
                f"{html.escape(labels[i])}: {value:.1%}</title></rect>")  # fmt: skip

    parts = [f"<text x='{left}' y='10' font-weight='bold'>{html.escape(title)}</text>",
             f"<text x='2' y='24'>{top:.0%}</text><text x='2' y='{height - bottom}'>0</text>",
             f"<text x='{width - 150}' y='10' fill='#888'>baseline</text>",
             f"<text x='{width - 90}' y='10' fill='{COLORS[0]}'>now</text>"]  # fmt: skip
    for i, label in enumerate(labels):
        parts.append(bar(i, baseline[i], slot * 0.1, "#aaa", "baseline"))
        parts.append(bar(i, current[i], slot * 0.5, COLORS[0], "now"))
        parts.append(f"<text x='{left + i * slot + slot / 2:.1f}' y='{height - bottom + 12}' text-anchor='middle' "
                     f"font-size='9'>{html.escape(label[:12])}</text>")  # fmt: skip
    return (f"<svg class='distribution' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
            f"font-family='sans-serif' font-size='11'>{''.join(parts)}</svg>")  # fmt: skip
