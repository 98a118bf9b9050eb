"""The monitoring page: per model version, each field now against its baseline, drift and agreement over time."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jinja2
from aiohttp import web

from contract.naming import model_cluster
from controlplane.pipeline.model import PipelineVersion
from controlplane.view import PlaneReader
from controlplane.web.charts import distribution_svg, line_chart, wall_time
from controlplane.web.render import page


def _series(history: Sequence[tuple[float, Mapping[str, float]]], now_wall: float, now: float) -> dict[str, Any]:
    """(wall time, {label: value}) -> {label: [(monotonic time, value)]}, on the charts' clock."""
    found: dict[str, list[tuple[float, float]]] = {}
    for at, values in history:
        for label, value in values.items():
            found.setdefault(label, []).append((now - (now_wall - at), value))
    return found


MARKS = 6  # the newest version changes marked per model version


def version_changes(history: Mapping[str, Sequence[PipelineVersion]]) -> dict[str, list[tuple[float, str]]]:
    """Model version cluster -> (wall time, "pipeline vN cause") of each pipeline version that sent to it or
    stopped sending to it (it, or the version before it, names the model version): the moments its charts mark."""
    found: dict[str, list[tuple[float, str]]] = {}
    for name, versions in history.items():
        before: set[str] = set()
        for v in versions:
            now = {c for stage in v.pipeline.stages for c in stage.clusters()}
            at = wall_time(v.created_at)
            if at is not None:
                for cluster in now | before:
                    found.setdefault(cluster, []).append((at, f"{name} v{v.version} {v.cause[:24]}"))
            before = now
    return {cluster: marks[-MARKS:] for cluster, marks in found.items()}


def monitoring_page(
    rows: Sequence[Mapping[str, Any]],
    changes: Mapping[str, Sequence[tuple[float, str]]] | None = None,
    signed_in: bool = False,
    csrf: str = "",
) -> str:
    now_wall, now = time.time(), time.monotonic()
    shown = []
    for row in rows:
        changed = (changes or {}).get(model_cluster(row["model"], row["version"]), ())
        marks = [(now - (now_wall - at), label) for at, label in changed]
        base = row.get("baseline")
        drifted = {f"{d['side']}.{d['field']}": d for d in row["drift"] if base and d["psi"] > base["threshold"]}
        fields = []
        for name, summary in sorted(row["fields"].items()):
            drifts = [d for d in row["drift"] if f"{d['side']}.{d['field']}" == name]
            state = (
                "drifted"
                if name in drifted
                else "too few"
                if name in row["too_few"]
                else ("stable" if drifts else "no baseline")
            )
            pictures = [
                jinja2.utils.markupsafe.Markup(
                    distribution_svg(f"{name} ({b['of']})", b["labels"], b["baseline"], b["current"])
                )
                for b in row.get("bins", {}).get(name, [])
            ]
            fields.append({"name": name, "summary": summary, "drifts": drifts, "state": state, "pictures": pictures})
        charts = []
        start = now - 600
        if row.get("drift_over_time"):
            drift = _series(row["drift_over_time"], now_wall, now)
            chart = line_chart("drift (PSI) per field", drift, start, now, marks, unit="PSI")
            charts.append(jinja2.utils.markupsafe.Markup(chart))
        if row.get("agreement_over_time"):
            agree = _series(row["agreement_over_time"], now_wall, now)
            chart = line_chart("agreement with the primary", agree, start, now, marks, unit="%")
            charts.append(jinja2.utils.markupsafe.Markup(chart))
        shown.append({**row, "field_rows": fields, "charts": charts})
    return page(
        "monitoring.html",
        title="monitoring",
        rows=shown,
        section="/monitoring",
        signed_in=signed_in,
        csrf=csrf,
        live=10,
    )


def add_routes(app: web.Application, reader: PlaneReader, viewer: Callable[[web.Request], dict[str, Any]]) -> None:
    async def monitoring(request: web.Request) -> web.Response:
        view = reader.view()
        text = monitoring_page(view.monitoring_page(), version_changes(view.history), **viewer(request))
        return web.Response(text=text, content_type="text/html")

    app.router.add_get("/monitoring", monitoring)
