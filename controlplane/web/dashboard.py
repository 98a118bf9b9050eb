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

from contract.naming import CONTROL_PLANE_IDENTITY, model_cluster
from controlplane.consul.presence import Presence
from controlplane.delivery.rollouts import state as rollout_state
from controlplane.delivery.switch import switch_notes
from controlplane.delivery.traffic import VariantTraffic
from controlplane.monitoring.callers import CallerCounts, as_dicts, refused_text
from controlplane.pipeline.model import JOIN_GROUP
from controlplane.pipeline.spec import pipeline_to_dict
from controlplane.view import PlaneReader, PlaneView, ScaleRow
from controlplane.web.auth import viewer
from controlplane.web.charts import health_word, line_chart, pipeline_svg, rate_series, wall_time
from controlplane.web.manage import LocalAdmin, add_ui_routes
from controlplane.web.metrics import metrics_handler
from controlplane.web.monitoring import add_routes as add_monitoring_routes
from controlplane.web.render import SCRIPT, STYLESHEET, badge, shell
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


def render_replays(reports: Sequence[Mapping[str, Any]], running: str | None) -> str:
    """The newest replay reports of a pipeline: shares overall and per change of the served chain.

    A report is what a replaying client sent: every value is escaped and every share checked."""
    e = html.escape
    out = ["<h3>Replays</h3>"] + ([f"<p>replay {e(running)} is running</p>"] if running else [])
    if not reports:
        return "".join(out) + "<p>none yet: <code>mllambda replay PIPELINE --candidate FILE</code></p>"
    for r in reports[:REPLAYS_SHOWN]:
        lat = _mapping(r.get("latency_ms"))
        p99s = [e(str(_mapping(lat.get(k)).get("p99"))) for k in ("candidate", "recorded")]
        shares = [_share(r.get(f"{k}_share")) for k in ("equal", "changed", "failed")]
        out.append(
            f"<p><b>{e(str(r.get('id')))}</b>: {e(str(r.get('requests')))} requests, {shares[0]} equal, "
            f"{shares[1]} changed, {shares[2]} failed; p99 {p99s[0]} ms (recorded {p99s[1]} ms)</p>"
        )
        listed = r.get("by_chain")
        chains = [_mapping(c) for c in (listed[:10] if isinstance(listed, list) else [])]
        rows = "".join(
            f"<tr><td>{e(str(c.get('chain')))}</td><td>{e(str(c.get('requests')))}</td>"
            + "".join(f"<td>{_share(c.get(f'{k}_share'))}</td>" for k in ("equal", "changed", "failed"))
            + "</tr>"
            for c in chains
        )
        heads = "".join(f"<th>{h}</th>" for h in ("served by the candidate", "requests", "equal", "changed", "failed"))
        out.append(f"<table><tr>{heads}</tr>{rows}</table>")
    return "".join(out)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _share(value: Any) -> str:
    return _pct(value) if isinstance(value, int | float) and not isinstance(value, bool) else "-"


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


def version_badges(view: PlaneView, current: Any) -> str:
    """The version in traffic, a pending one, the ones draining; `rolled back` when the current one is a rollback."""
    report = view.switch.get(current.pipeline.name, {})
    entry = report.get("entry") or current.version
    out = [badge(f"v{entry} in traffic", "passing")]
    if report.get("pending"):
        out.append(badge(f"v{report['pending']} pending", "pending"))
    out += [badge(f"v{n} draining", "draining") for n in report.get("draining") or ()]
    if "rollback" in current.cause or "rolled back" in current.cause:
        out.append(badge("rolled back", "rolledback"))
    return " ".join(out)


def render_dashboard(view: PlaneView, status: dict[str, Any], signed_in: bool = False, csrf: str = "") -> str:
    e = html.escape
    health = health_of(view)
    nodes = status["nodes"]
    failing_nodes = sum(1 for n in nodes if n["nack"])
    up = sum(1 for r in view.runtimes if r.passing)
    consul = badge("Consul reachable", "passing") if view.consul.reachable else badge("Consul UNREACHABLE", "failing")
    envoys = badge(f"{len(nodes)} Envoys, {failing_nodes} rejecting config", "failing" if failing_nodes else "passing")
    runtimes = badge(
        f"{up}/{len(view.runtimes)} runtimes passing", "passing" if up == len(view.runtimes) else "failing"
    )
    parts = [
        f"<h1>Pipelines</h1><p class='row'>{consul} {runtimes} {envoys} <a href='{e(view.consul_ui)}'>Consul UI</a>"
        " <a href='/api/status'>status as JSON</a> <a href='/metrics'>metrics</a></p>",
        "<div class='cards'>",
    ]
    for current in view.pipelines:
        p = current.pipeline
        parts.append(
            f"<section class='card pipeline' data-name='{e(p.name)}'>"
            f"<h2><a href='/pipelines/{e(p.name)}'>{e(p.name)}</a> <small>{e(p.transport)}</small></h2>"
            f"<p class='row'>{version_badges(view, current)}"
            f" <a href='/pipelines/{e(p.name)}/edit'>change</a></p>"
            f"<p class='muted'>v{current.version} · {e(current.cause)}{_switch_note(view, p.name)}</p>"
        )
        versions = view.history.get(p.name, [])[-HISTORY_SHOWN:]
        shown = ", ".join(f"v{h.version} ({e(h.cause)}, {e(h.created_at)})" for h in versions)
        parts.append(f"<details><summary>history</summary><p class='history'>{shown}</p></details><ol>")
        for stage in p.stages:
            cells = []
            for key, variants in stage.groups():
                total = sum(v.weight for v in variants) or 1
                split = ", ".join(
                    f"<span class='{health_word(*health.get(v.cluster, (0, 0)))}'>{e(v.model)}:{e(v.version)}</span>"
                    f" {100 * v.weight / total:.0f}%"
                    for v in variants
                )
                label = "" if not key else f"{'member' if stage.members else 'branch'} {e(key)}: "
                label = "join: " if key == JOIN_GROUP else label
                cells.append(label + split)
            for member, s in stage.shadows():
                about = f" of member {e(member)}" if member else ""
                cells.append(f"shadow{about} {e(s.model)}:{e(s.version)} {s.percent:g}%")
            cells += [f"member {e(m.name)}: optional, {m.timeout_ms} ms" for m in stage.members if not m.required]
            cells += ["asked over the Open Inference Protocol"] if stage.protocol == "oip" else []
            for key, ro in [("", stage.rollout), *((b.key, b.rollout) for b in stage.branches)]:
                if ro is not None:
                    where = f" in branch {e(key)}" if key else ""
                    cand = f"{e(ro.candidate.model)}:{e(ro.candidate.version)}"
                    cells.append(f"rollout{where} to {cand}: {badge(rollout_state(ro), 'pending')}")
            parts.append(f"<li><b>{e(stage.name)}</b>: {'; '.join(cells)}</li>")
        parts.append("</ol></section>")
    parts.append("</div>" + ("" if view.pipelines else "<p>No pipelines yet: <code>mllambda apply -f FILE</code>.</p>"))
    if view.broken:
        parts.append("<h2>Skipped records</h2><ul class='broken'>")
        parts += [f"<li>{e(name)}: {e(reason)}</li>" for name, reason in sorted(view.broken.items())]
        parts.append("</ul>")
    if view.translate_failed:
        parts.append("<h2>Config not updated</h2><ul class='failed'>")
        parts += [f"<li>{e(g)}: {e(why)}</li>" for g, why in sorted(view.translate_failed.items())[:50]]
        parts.append("</ul>")
    if view.consul.holding_since is not None:
        since = time.strftime("%H:%M:%S", time.localtime(view.consul.holding_since))
        parts.append(f"<p class='holding'>Every runtime vanished from Consul at {since}: the last ones are held.</p>")
    if view.pipelines_held_since is not None:
        since = time.strftime("%H:%M:%S", time.localtime(view.pipelines_held_since))
        parts.append(f"<p class='holding'>Every pipeline vanished from Consul KV at {since}: they are served on.</p>")
    parts.append("<h2>Runtimes</h2><p class='row runtimes'>")
    for model, version in sorted({(r.model, r.version) for r in view.runtimes}):
        passing, registered = health[model_cluster(model, version)]
        word = health_word(passing, registered)
        parts.append(badge(f"{model}:{version} {passing}/{registered} {word}", word))
    parts.append(" <a href='/runtimes'>every instance</a></p>")
    if view.scaling:
        parts.append("<h2>Autoscaling</h2><div class='scroll'><table class='scaling'><tr><th>version</th>")
        parts.append("<th>replicas wanted / passing</th><th>bounds</th><th>last decision</th></tr>")
        for row in view.scaling:
            when = time.strftime("%H:%M:%S", time.localtime(row.decided_at)) if row.decided_at else ""
            wanted = "-" if row.wanted is None else row.wanted
            parts.append(
                f"<tr><td>{e(row.model)}:{e(row.version)}</td><td>{wanted} / {row.passing}</td>"
                f"<td>{row.min_replicas}..{row.max_replicas}</td><td>{e(when)} {e(row.reason)}{_cold(row)}</td></tr>"
            )
        parts.append("</table></div>")
    if view.stack:
        parts.append("<h2>Stack processes</h2><div class='scroll'><table class='stack'><tr><th>process</th>")
        parts.append("<th>state</th><th>restarts</th><th>last exit</th></tr>")
        for proc in view.stack:
            kind = str(proc.get("state", "running"))
            lines = str(proc.get("last_lines", "")) if kind == "failing" else ""
            tail = f"<pre>{e(lines[-800:])}</pre>" if lines else ""
            word = {"running": "passing", "restarting": "draining"}.get(kind, "failing")
            parts.append(
                f"<tr class='{e(kind)}'><td>{e(str(proc.get('name', '')))}</td><td>{badge(kind, word)}</td>"
                f"<td>{e(str(proc.get('restarts', 0)))}</td><td>{e(str(proc.get('last_exit', '')))}{tail}</td></tr>"
            )
        parts.append("</table></div>")
    if view.consul.refused:
        parts.append("<h2>Ignored registrations</h2><ul class='refused'>")
        parts += [f"<li>{e(sid)}: {e(why)}</li>" for sid, why in sorted(view.consul.refused.items())[:50]]
        parts.append("</ul>")
    parts.append("<h2>Traffic</h2><div class='scroll'>" + render_traffic(status["traffic"]) + "</div>")
    if view.callers:
        parts.append("<h2>Admission by caller</h2><div class='scroll'>" + render_callers(view.callers) + "</div>")
    summary = f"Envoys: {len(nodes)} nodes, {failing_nodes} rejecting config"
    parts.append(f"<details{' open' if failing_nodes else ''}><summary><h2>{summary}</h2></summary>")
    parts.append("<div class='scroll'><table><tr><th>node</th><th>acked</th><th>last NACK</th><th>updated</th></tr>")
    for n in nodes:
        age = f"{n['age_seconds']:.0f} s ago" if n["age_seconds"] is not None else ""
        cells = [e(n["node"]) + ("" if n["connected"] else " (gone)"), e(n["acked"]), e(n["nack"]), age]
        parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("</table></div></details>")
    admin_links = " · ".join(f"<a href='{e(u)}'>{e(n)}</a>" for n, u in sorted(view.envoy_admin.items()))
    parts.append(f"<p>Envoy admin: {admin_links}</p>")
    if status["kafka_bridges"]:
        parts.append(f"<p>Kafka bridges: {e(', '.join(status['kafka_bridges']))}</p>")
    return shell("pipelines", "".join(parts), section="/", live=3, signed_in=signed_in, csrf=csrf)


def _cold(row: ScaleRow) -> str:
    return "" if row.cold_start_s is None else f" (last cold start {row.cold_start_s:.1f} s)"


def _switch_note(view: PlaneView, name: str) -> str:
    return "".join(f" · {html.escape(note)}" for note in switch_notes(view.switch.get(name, {})))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _window(seconds: float | None) -> str:
    return "" if seconds is None else f" <small>({seconds:.0f} s)</small>"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render_traffic(rows: list[dict[str, Any]]) -> str:
    e = html.escape
    out = [
        "<table id='traffic'><tr><th>pipeline</th><th>stage</th><th>branch</th><th>variant</th><th>weight</th>"
        "<th>observed (window)</th><th>requests</th><th>5xx</th><th>refused (429, 503)</th><th>retries</th>"
        "<th>p50 ms</th><th>p99 ms</th></tr>"
    ]
    for t in rows:
        errors = f"{100 * t['errors'] / t['requests']:.1f}%" if t["requests"] else "-"
        out.append(
            f"<tr><td>{e(t['pipeline'])}</td><td>{e(t['stage'])}</td><td>{e(t['branch'])}</td>"
            f"<td class='variant'>{e(t['model'])}:{e(t['version'])}</td><td>{_pct(t['configured_share'])}</td>"
            f"<td class='observed'>{_pct(t['observed_share'])}{_window(t.get('window_seconds'))}</td>"
            f"<td>{t['requests']}</td><td>{errors}</td><td>{t.get('refused', 0)}</td>"
            f"<td>{t['retries']}</td>"
            f"<td>{_ms(t['p50_ms'])}</td><td>{_ms(t['p99_ms'])}</td></tr>"
        )
    return "".join(out) + "</table>"


def render_callers(rows: Sequence[CallerCounts]) -> str:
    """Admitted and refused per caller key and model version, as the runtimes counted them (fairness)."""
    e = html.escape
    out = ["<table id='callers'><tr><th>version</th><th>caller</th><th>admitted</th><th>refused</th></tr>"]
    for r in rows:
        out.append(
            f"<tr><td>{e(r.model)}:{e(r.version)}</td><td class='caller'>{e(r.caller)}</td><td>{r.admitted}</td>"
            f"<td>{e(refused_text(r.refused))}</td></tr>"
        )
    return "".join(out) + "</table>"


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
    current: Any,
    rows: list[VariantTraffic],
    minutes: int = 15,
    signed_in: bool = False,
    csrf: str = "",
) -> str:
    """One pipeline's home: its versions' state, its graph (weights, windowed shares, health, rollouts), its
    variants' traffic over the chosen minutes, its replays, and a way to change it."""
    p, e = current.pipeline, html.escape
    now = time.monotonic()
    first = view.readings[0][0] if view.readings else now
    start = max(now - minutes * 60, first - 5)  # a young control plane's chart starts with its readings
    clusters = sorted({v.cluster for stage in p.stages for v in stage.all_variants()})
    rps, errors, p99 = rate_series(view.readings, clusters, start)
    marks = version_marks(view, p.name, now)
    seen = next((r.window_seconds for r in rows if r.window_seconds), None)
    window = f"shares seen over the last {seen:.0f} s of v{current.version}" if seen else "no traffic seen yet"
    ranges = " ".join(
        f"<span aria-current='true'>{m} min</span>" if m == minutes else f"<a href='?minutes={m}'>{m} min</a>"
        for m in CHART_MINUTES
    )
    body = [
        f"<h1>{e(p.name)} <small>{e(p.transport)}</small></h1>",
        f"<p class='row'>{version_badges(view, current)} <span class='muted'>v{current.version}: {e(current.cause)}"
        f"{_switch_note(view, p.name)}</span> <a href='/pipelines/{e(p.name)}/edit'>change this pipeline</a></p>",
        _quota_note(view, p),
        f"<section class='card'><h2>Graph <small>{e(window)}</small></h2><div class='scroll'>",
        pipeline_svg(p, rows, health_of(view)),
        "</div></section>",
        f"<section class='card'><h2>Over time</h2><p class='range'>range: {ranges}</p>",
        line_chart("requests per second, per model version", rps, start, now, marks, unit="req/s"),
        line_chart("5xx share of requests, per model version", errors, start, now, marks, unit="%"),
        line_chart("p99 latency, per model version (Envoy's last 5 s)", p99, start, now, marks, unit="ms"),
        "</section>",
        "<section class='card'><h2>Traffic now</h2><div class='scroll'>",
        render_traffic([asdict(r) for r in rows]),
        "</div></section><section class='card'>",
        render_replays(view.replay_reports.get(p.name, ()), view.replays_running.get(p.name)),
        "</section>",
    ]
    return shell(p.name, "".join(body), section="/", live=5, signed_in=signed_in, csrf=csrf)


def _quota_note(view: PlaneView, p: Any) -> str:
    """The pipeline's quota per caller and what it refused at the gateway ("" without one)."""
    if p.rate_limit is None:
        return ""
    limit, refused = p.rate_limit, view.rate_limited().get(p.name, 0)
    per = html.escape(p.fairness_header or "client address")
    weighed = ", ".join(f"{html.escape(key)} \u00d7{weight}" for key, weight in p.fairness_shares)
    return (
        f"<p class='muted' id='rate-limit'>rate limit {limit.per_second}/s, burst {limit.burst}, per {per}: "
        f"{refused} refused at the gateway{'; weighed: ' + weighed if weighed else ''}</p>"
    )


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
