"""The control plane's page for people: /api/status as JSON and the dashboard rendered from it.

Both are pure functions of a `PlaneView` and the observed traffic; the web app
at the bottom wires them (and /metrics) to a `PlaneReader`.
"""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import consul
from aiohttp import web
from markupsafe import Markup

from contract.naming import CONTROL_PLANE_IDENTITY, model_cluster
from controlplane.consul.presence import Presence
from controlplane.delivery.rollouts import state as rollout_state
from controlplane.delivery.switch import switch_notes
from controlplane.delivery.traffic import VariantTraffic
from controlplane.monitoring.callers import as_dicts, refused_text
from controlplane.pipeline.model import JOIN_GROUP, Pipeline, PipelineVersion
from controlplane.pipeline.spec import pipeline_to_dict
from controlplane.view import PlaneReader, PlaneView, ScaleRow
from controlplane.web.auth import viewer
from controlplane.web.charts import health_word, line_chart, percent, pipeline_svg, rate_series, wall_time
from controlplane.web.manage import LocalAdmin, add_ui_routes
from controlplane.web.metrics import metrics_handler
from controlplane.web.monitoring import add_routes as add_monitoring_routes
from controlplane.web.render import SCRIPT, STYLESHEET, badge, page, part
from controlplane.xds.snapshot import short

log = logging.getLogger("mllambda.dashboard")
STYLE_BYTES, SCRIPT_BYTES = STYLESHEET.read_bytes(), SCRIPT.read_bytes()
HISTORY_SHOWN = 5  # versions per pipeline on the page


def status_document(view: PlaneView, traffic: Sequence[VariantTraffic]) -> dict[str, Any]:
    """What /api/status answers and `mllambda status` prints."""
    return {
        "history": {
            name: [{"version": v.version, "cause": v.cause, "created_at": v.created_at} for v in versions]
            for name, versions in view.history.items()
        },
        "traffic": [asdict(t) for t in traffic],
        "links": {"consul_ui": view.consul_ui, "envoy_admin": dict(view.envoy_admin)},
        "pipelines": [
            {
                "version": v.version,
                "created_at": v.created_at,
                "cause": v.cause,
                **pipeline_to_dict(v.pipeline),
                "serving": view.switch.get(v.pipeline.name, {}),
            }
            for v in view.pipelines
        ],
        "rate_limited": view.rate_limited(),
        "admission_by_caller": as_dicts(view.callers),
        "runtimes": [
            {"service_id": i.service_id, "model": i.model, "version": i.version, "passing": i.passing}
            for i in view.runtimes
        ],
        "envoys": [
            {
                "node": s.node_id,
                "type": short(s.type_url),
                "acked": s.acked_version,
                "nack_version": s.nack_version,
                "nack_error": s.nack_error,
                "connected": s.node_id in view.connected,
            }
            for s in view.acks
        ],
        "nodes": per_node(view),
        "consul": {
            "reachable": view.consul.reachable,
            "errors": view.consul.errors,
            "holding_since": view.consul.holding_since,
            "refused": dict(view.consul.refused),
        },
        "kafka_bridges": [f"{host}:{port}" for host, port in view.kafka_bridges],
        "broken_records": dict(view.broken),
        "translate_failed": dict(view.translate_failed),
        "control_planes": dict(view.control_planes),
        "rollouts": {"driving": view.rollouts_driving, "moves": view.rollout_moves},
        "scaling": [asdict(row) for row in view.scaling],
        "stack_processes": [dict(p) for p in view.stack],
        "replays": {
            name: {"running": view.replays_running.get(name), "reports": [_replay_summary(r) for r in reports]}
            for name, reports in view.replay_reports.items()
        },
        "generated_at": time.time(),
    }


REPLAY_KEYS = (
    "id",
    "requests",
    "equal_share",
    "changed_share",
    "failed_share",
    "by_chain",
    "failed_by",
    "latency_ms",
    "candidate_models",
    "finished_at",
)
REPLAYS_SHOWN = 3  # on a pipeline's page


def _replay_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """A kept replay report without its examples (they hold user data: `mllambda replay P -o json` shows them)."""
    return {k: report.get(k) for k in REPLAY_KEYS}


def render_replays(reports: Sequence[Mapping[str, Any]], running: str | None) -> Markup:
    """The newest replay reports of a pipeline: shares overall and per change of the served chain.

    A report is what a replaying client sent: the template escapes every value; every share is checked."""
    shown = []
    for r in reports[:REPLAYS_SHOWN]:
        lat = _mapping(r.get("latency_ms"))
        listed = r.get("by_chain")
        chains = [_mapping(c) for c in (listed[:10] if isinstance(listed, list) else [])]
        shown.append(
            {
                "id": str(r.get("id")),
                "requests": str(r.get("requests")),
                "shares": [_share(r.get(f"{k}_share")) for k in SHARES],
                "p99s": [str(_mapping(lat.get(k)).get("p99")) for k in ("candidate", "recorded")],
                "chains": [
                    {
                        "chain": str(c.get("chain")),
                        "requests": str(c.get("requests")),
                        "shares": [_share(c.get(f"{k}_share")) for k in SHARES],
                    }
                    for c in chains
                ],
            }
        )
    return part("replays", shown, running)


SHARES = ("equal", "changed", "failed")


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _share(value: Any) -> str:
    return percent(value) if isinstance(value, int | float) and not isinstance(value, bool) else "-"


NACK_SHOWN = 160  # characters of a node's last NACK in the node table (describe shows it whole)


def per_node(view: PlaneView) -> list[dict[str, Any]]:
    """One row per Envoy: the config version it acknowledged (per type when they differ), its last NACK, age."""
    by_node: dict[str, list[Any]] = {}
    for ack in view.acks:
        by_node.setdefault(ack.node_id, []).append(ack)
    rows = []
    for node, acks in sorted(by_node.items()):
        versions = {short(a.type_url): a.acked_version or "-" for a in acks}
        same = set(versions.values())
        acked = same.pop() if len(same) == 1 else ", ".join(f"{t} {v}" for t, v in sorted(versions.items()))
        nacked = max((a for a in acks if a.nack_error), key=lambda a: a.updated_at, default=None)
        nack = f"{short(nacked.type_url)} {nacked.nack_version}: {nacked.nack_error}"[:NACK_SHOWN] if nacked else ""
        newest = max((a.updated_at for a in acks), default=0.0)
        rows.append(
            {
                "node": node,
                "connected": node in view.connected,
                "acked": acked,
                "nack": nack,
                "age_seconds": round(time.time() - newest, 1) if newest else None,
            }
        )
    return rows


def health_of(view: PlaneView) -> dict[str, tuple[int, int]]:
    """Model version cluster -> (replicas passing, registered), from Consul as the control plane sees it."""
    found: dict[str, tuple[int, int]] = {}
    for r in view.runtimes:
        passing, registered = found.get(model_cluster(r.model, r.version), (0, 0))
        found[model_cluster(r.model, r.version)] = (passing + r.passing, registered + 1)
    return found


def version_badges(view: PlaneView, current: PipelineVersion) -> Markup:
    """The version in traffic, a pending one, the ones draining; `rolled back` when the current one is a rollback."""
    report = view.switch.get(current.pipeline.name, {})
    entry = report.get("entry") or current.version
    out = [badge(f"v{entry} in traffic", "passing")]
    if report.get("pending"):
        out.append(badge(f"v{report['pending']} pending", "pending"))
    out += [badge(f"v{n} draining", "draining") for n in report.get("draining") or ()]
    if "rollback" in current.cause or "rolled back" in current.cause:
        out.append(badge("rolled back", "rolledback"))
    return Markup(" ").join(out)


def render_dashboard(view: PlaneView, status: dict[str, Any], signed_in: bool = False, csrf: str = "") -> str:
    health = health_of(view)
    nodes = status["nodes"]
    runtime_badges = []
    for model, version in sorted({(r.model, r.version) for r in view.runtimes}):
        passing, registered = health[model_cluster(model, version)]
        word = health_word(passing, registered)
        runtime_badges.append((f"{model}:{version} {passing}/{registered} {word}", word))
    return page(
        "dashboard.html",
        title="pipelines",
        section="/",
        live=3,
        signed_in=signed_in,
        csrf=csrf,
        consul_reachable=view.consul.reachable,
        up=sum(1 for r in view.runtimes if r.passing),
        runtime_count=len(view.runtimes),
        nodes=nodes,
        failing_nodes=sum(1 for n in nodes if n["nack"]),
        consul_ui=view.consul_ui,
        cards=[_card(view, current, health) for current in view.pipelines],
        broken=sorted(view.broken.items()),
        translate_failed=sorted(view.translate_failed.items())[:50],
        holding_since=_clock(view.consul.holding_since),
        pipelines_held_since=_clock(view.pipelines_held_since),
        runtime_badges=runtime_badges,
        scaling=[_scale_row(row) for row in view.scaling],
        stack=[_stack_row(proc) for proc in view.stack],
        refused=sorted(view.consul.refused.items())[:50],
        traffic=[_traffic_row(t) for t in status["traffic"]],
        callers=[
            {
                "model": r.model,
                "version": r.version,
                "caller": r.caller,
                "admitted": r.admitted,
                "refused": refused_text(r.refused),
            }
            for r in view.callers
        ],
        envoy_admin=sorted(view.envoy_admin.items()),
        kafka_bridges=status["kafka_bridges"],
    )


def _card(view: PlaneView, current: PipelineVersion, health: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
    """A pipeline on the dashboard: its versions' state, recent history, and per stage what it sends where."""
    p = current.pipeline
    stages = []
    for stage in p.stages:
        cells: list[dict[str, Any]] = []
        for key, variants in stage.groups():
            total = sum(v.weight for v in variants) or 1
            label = "" if not key else f"{'member' if stage.members else 'branch'} {key}: "
            shown = [
                {
                    "health": health_word(*health.get(v.cluster, (0, 0))),
                    "model": v.model,
                    "version": v.version,
                    "share": f"{100 * v.weight / total:.0f}%",
                }
                for v in variants
            ]
            cells.append({"kind": "split", "label": "join: " if key == JOIN_GROUP else label, "variants": shown})
        for member, s in stage.shadows():
            about = f" of member {member}" if member else ""
            cells.append({"kind": "text", "text": f"shadow{about} {s.model}:{s.version} {s.percent:g}%"})
        cells += [
            {"kind": "text", "text": f"member {m.name}: optional, {m.timeout_ms} ms"}
            for m in stage.members
            if not m.required
        ]
        cells += [{"kind": "text", "text": "asked over the Open Inference Protocol"}] if stage.protocol == "oip" else []
        for key, ro in [("", stage.rollout), *((b.key, b.rollout) for b in stage.branches)]:
            if ro is not None:
                cells.append(
                    {
                        "kind": "rollout",
                        "where": f" in branch {key}" if key else "",
                        "candidate": f"{ro.candidate.model}:{ro.candidate.version}",
                        "state": rollout_state(ro),
                    }
                )
        stages.append({"name": stage.name, "cells": cells})
    return {
        "name": p.name,
        "transport": p.transport,
        "badges": version_badges(view, current),
        "version": current.version,
        "cause": current.cause,
        "notes": switch_notes(view.switch.get(p.name, {})),
        "history": view.history.get(p.name, [])[-HISTORY_SHOWN:],
        "stages": stages,
    }


def _clock(at: float | None) -> str:
    return "" if at is None else time.strftime("%H:%M:%S", time.localtime(at))


def _scale_row(row: ScaleRow) -> dict[str, Any]:
    return {
        "model": row.model,
        "version": row.version,
        "wanted": "-" if row.wanted is None else row.wanted,
        "passing": row.passing,
        "bounds": f"{row.min_replicas}..{row.max_replicas}",
        "when": _clock(row.decided_at) if row.decided_at else "",
        "reason": row.reason + _cold(row),
    }


def _stack_row(proc: Mapping[str, Any]) -> dict[str, Any]:
    """A supervised process of the local stack; a failing one with the last lines it wrote."""
    kind = str(proc.get("state", "running"))
    lines = str(proc.get("last_lines", "")) if kind == "failing" else ""
    return {
        "state": kind,
        "word": {"running": "passing", "restarting": "draining"}.get(kind, "failing"),
        "name": str(proc.get("name", "")),
        "restarts": str(proc.get("restarts", 0)),
        "last_exit": str(proc.get("last_exit", "")),
        "tail": lines[-800:],
    }


def _cold(row: ScaleRow) -> str:
    return "" if row.cold_start_s is None else f" (last cold start {row.cold_start_s:.1f} s)"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _traffic_row(t: Mapping[str, Any]) -> dict[str, Any]:
    """A variant's row of the traffic table (a VariantTraffic as a dict), as shown."""
    window = t.get("window_seconds")
    return {
        "pipeline": t["pipeline"],
        "stage": t["stage"],
        "branch": t["branch"],
        "model": t["model"],
        "version": t["version"],
        "configured": percent(t["configured_share"]),
        "observed": percent(t["observed_share"]),
        "window": None if window is None else f"{window:.0f}",
        "requests": t["requests"],
        "errors": f"{100 * t['errors'] / t['requests']:.1f}%" if t["requests"] else "-",
        "refused": t.get("refused", 0),
        "retries": t["retries"],
        "p50": _ms(t["p50_ms"]),
        "p99": _ms(t["p99_ms"]),
    }


LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def _hosts_only(bound: str) -> Any:
    """Answer only requests addressed to this machine by loopback name or address, or the address it listens on.

    A page on another site can make a browser send requests to 127.0.0.1 under
    its own host name (DNS rebinding); such a request carries that name in `Host`.
    """
    allowed = {*LOCAL_HOSTS, bound}

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        host = request.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name not in allowed:
            return web.json_response({"error": f"host {host[:100]!r} is not this dashboard's"}, status=421)
        return await handler(request)

    return check


def build_dashboard_app(reader: PlaneReader, ui: LocalAdmin | None = None, bound: str = "127.0.0.1") -> web.Application:
    """/ (the page), /api/status (JSON), /metrics (Prometheus); with `ui`, the pages that change pipelines
    (controlplane/web/manage.py) for a signed-in browser."""

    async def api_status(request: web.Request) -> web.Response:
        failing = [asdict(t) for t in await reader.failing_deployments()]
        return web.json_response({**status_document(reader.view(), await reader.recent_traffic()), "failing": failing})

    async def dashboard(request: web.Request) -> web.Response:
        view = reader.view()
        page = render_dashboard(view, status_document(view, await reader.recent_traffic()), **who(request))
        return web.Response(text=page, content_type="text/html")

    async def pipeline_page(request: web.Request) -> web.Response:
        view, name = reader.view(), request.match_info["name"]
        current = next((v for v in view.pipelines if v.pipeline.name == name), None)
        if current is None:
            return web.Response(status=404, text=f"no pipeline {html.escape(name)!r}", content_type="text/html")
        rows = [r for r in await reader.recent_traffic() if r.pipeline == name]
        asked = request.query.get("minutes", "")
        minutes = int(asked) if asked in {str(m) for m in CHART_MINUTES} else 15
        page = render_pipeline_page(view, current, rows, minutes, **who(request))
        return web.Response(text=page, content_type="text/html")

    def who(request: web.Request) -> dict[str, Any]:
        return viewer(ui.sessions if ui is not None else None, request)

    app = web.Application(middlewares=[_hosts_only(bound)], client_max_size=512 * 1024)
    if ui is not None:
        add_ui_routes(app, reader, ui.sessions, ui.admin)

    async def stylesheet(request: web.Request) -> web.Response:
        return web.Response(body=STYLE_BYTES, content_type="text/css", headers={"cache-control": "max-age=300"})

    async def script(request: web.Request) -> web.Response:
        return web.Response(body=SCRIPT_BYTES, content_type="text/javascript", headers={"cache-control": "max-age=300"})

    app.router.add_get("/static/mllambda.css", stylesheet)
    app.router.add_get("/static/mllambda.js", script)
    app.router.add_get("/metrics", metrics_handler(reader))
    app.router.add_get("/api/status", api_status)
    app.router.add_get("/pipelines/{name}", pipeline_page)
    add_monitoring_routes(app, reader, who)
    app.router.add_get("/", dashboard)
    return app


CHART_MINUTES = (5, 15, 60)  # the time ranges a pipeline's page offers (readings are kept an hour)


def version_marks(view: PlaneView, name: str, now: float) -> list[tuple[float, str]]:
    """When each recent version was written (a rollout step, a rollback: its cause), and when the current one
    took traffic, on the charts' clock."""
    marks = []
    for v in view.history.get(name, [])[-12:]:
        written = wall_time(v.created_at)
        if written is None:
            continue
        marks.append((now - (time.time() - written), f"v{v.version} {v.cause[:40]}"))
    entered = view.entered_at.get(name)
    return marks + ([(entered, "in traffic")] if entered else [])


def render_pipeline_page(
    view: PlaneView,
    current: PipelineVersion,
    rows: list[VariantTraffic],
    minutes: int = 15,
    signed_in: bool = False,
    csrf: str = "",
) -> str:
    """One pipeline's home: its versions' state, its graph (weights, windowed shares, health, rollouts), its
    variants' traffic over the chosen minutes, its replays, and a way to change it."""
    p = current.pipeline
    now = time.monotonic()
    first = view.readings[0][0] if view.readings else now
    start = max(now - minutes * 60, first - 5)  # a young control plane's chart starts with its readings
    clusters = sorted({v.cluster for stage in p.stages for v in stage.all_variants()})
    rps, errors, p99 = rate_series(view.readings, clusters, start)
    marks = version_marks(view, p.name, now)
    seen = next((r.window_seconds for r in rows if r.window_seconds), None)
    charts = [
        line_chart("requests per second, per model version", rps, start, now, marks, unit="req/s"),
        line_chart("5xx share of requests, per model version", errors, start, now, marks, unit="%"),
        line_chart("p99 latency, per model version (Envoy's last 5 s)", p99, start, now, marks, unit="ms"),
    ]
    return page(
        "pipeline.html",
        title=p.name,
        section="/",
        live=5,
        signed_in=signed_in,
        csrf=csrf,
        name=p.name,
        transport=p.transport,
        badges=version_badges(view, current),
        version=current.version,
        cause=current.cause,
        notes=switch_notes(view.switch.get(p.name, {})),
        quota=_quota(view, p),
        window=f"shares seen over the last {seen:.0f} s of v{current.version}" if seen else "no traffic seen yet",
        graph=Markup(pipeline_svg(p, rows, health_of(view))),  # charts.py escapes what it draws
        ranges=CHART_MINUTES,
        minutes=minutes,
        charts=[Markup(chart) for chart in charts],
        traffic=[_traffic_row(asdict(r)) for r in rows],
        replays=render_replays(view.replay_reports.get(p.name, ()), view.replays_running.get(p.name)),
    )


def _quota(view: PlaneView, p: Pipeline) -> dict[str, Any] | None:
    """The pipeline's quota per caller and what it refused at the gateway (None without one)."""
    if p.rate_limit is None:
        return None
    return {
        "per_second": p.rate_limit.per_second,
        "burst": p.rate_limit.burst,
        "per": p.fairness_header or "client address",
        "refused": view.rate_limited().get(p.name, 0),
        "weighed": list(p.fairness_shares),
    }


class DashboardServer:
    """The dashboard, /api/status and /metrics on `address`, registered in Consul as the control plane
    (deploy/prometheus.yml finds every control plane, and its gateway's Envoy, there)."""

    def __init__(self, app: web.Application, address: tuple[str, int], client: Any, gateway_admin_port: int) -> None:
        self.app = app
        self.host, self.port = address
        check = consul.Check.tcp(self.host, self.port, interval="5s", timeout="1s", deregister="1m")
        meta = {"gateway_admin_port": str(gateway_admin_port)} if gateway_admin_port else {}
        service_id = f"{CONTROL_PLANE_IDENTITY}-{self.host}-{self.port}"
        self.presence = Presence(client, CONTROL_PLANE_IDENTITY, service_id, self.host, self.port, check, meta)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> DashboardServer:
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        log.info("dashboard and metrics at http://%s:%d/", self.host, self.port)
        await self.presence.start()
        return self

    async def stop(self) -> None:
        await self.presence.stop()
        await self._runner.cleanup()
