"""The control plane's HTTP side: Prometheus /metrics, /api/status as JSON, and a dashboard page.

Metrics are read from live state at scrape time (a custom collector), so there
is no second copy of the truth to keep in sync.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from controlplane.model import pipeline_to_dict
from controlplane.traffic import VariantTraffic

if TYPE_CHECKING:
    from controlplane.app import ControlPlane


class LatencyHistogram:
    """Cumulative buckets, exported as a Prometheus histogram by the collector."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self.counts = [0] * len(self.BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.total += 1
        self.sum += seconds
        for i, bound in enumerate(self.BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        buckets = [(str(b), float(c)) for b, c in zip(self.BUCKETS, self.counts, strict=True)]
        buckets.append(("+Inf", float(self.total)))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)


class StateCollector(Collector):
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.traffic: list[VariantTraffic] = []  # refreshed by the /metrics handler before each scrape

    def collect(self) -> Iterator[Any]:
        plane = self.plane
        connected = GaugeMetricFamily("mllambda_xds_connected_streams", "open ADS streams", labels=["mode"])
        for mode, count in plane.status.streams_by_mode().items():
            connected.add_metric([mode], count)
        yield connected
        acks = CounterMetricFamily("mllambda_xds_acks", "ACKs received", labels=["node", "type"])
        nacks = CounterMetricFamily("mllambda_xds_nacks", "NACKs received", labels=["node", "type"])
        for s in plane.status.all():
            kind = s.type_url.rsplit(".", 1)[-1]
            acks.add_metric([s.node_id, kind], s.acks)
            nacks.add_metric([s.node_id, kind], s.nacks)
        yield acks
        yield nacks
        pushes = CounterMetricFamily("mllambda_xds_snapshots_set", "snapshots set per node group", labels=["group"])
        for group, count in plane.snapshots_set.items():
            pushes.add_metric([group], count)
        yield pushes
        yield plane.push_latency.family("mllambda_xds_push_seconds", "snapshot set -> ACK, per node and type")
        info = GaugeMetricFamily(
            "mllambda_snapshot_info", "current snapshot per node group", labels=["group", "version"]
        )
        for group in plane.cache.groups():
            snapshot = plane.cache.get(group)
            if snapshot is not None:
                info.add_metric([group, snapshot.version], 1)
        yield info
        admin = CounterMetricFamily("mllambda_admin_requests", "admin API calls", labels=["method", "code"])
        for (method, code), count in plane.admin.calls.items():
            admin.add_metric([method, code], count)
        yield admin
        pipelines = GaugeMetricFamily("mllambda_pipeline_version", "current version", labels=["pipeline"])
        for version in plane.pipelines:
            pipelines.add_metric([version.pipeline.name], version.version)
        yield pipelines
        yield GaugeMetricFamily(
            "mllambda_consul_reachable", "discovery reaches Consul", value=int(plane.discovery.reachable)
        )
        yield CounterMetricFamily("mllambda_consul_watch_errors", "failed Consul queries", value=plane.discovery.errors)
        labels = ["pipeline", "stage", "branch", "model", "version"]
        requests = CounterMetricFamily("mllambda_variant_requests", "requests a variant received", labels=labels)
        errors = CounterMetricFamily("mllambda_variant_errors", "5xx answers from a variant", labels=labels)
        retries = CounterMetricFamily("mllambda_variant_retries", "retried requests to a variant", labels=labels)
        observed = GaugeMetricFamily("mllambda_variant_observed_share", "share of its split group", labels=labels)
        configured = GaugeMetricFamily("mllambda_variant_configured_share", "weight share", labels=labels)
        for t in self.traffic:
            key = [t.pipeline, t.stage, t.branch, t.model, t.version]
            requests.add_metric(key, t.requests)
            errors.add_metric(key, t.errors)
            retries.add_metric(key, t.retries)
            configured.add_metric(key, t.configured_share)
            if t.observed_share is not None:
                observed.add_metric(key, t.observed_share)
        yield from (requests, errors, retries, observed, configured)
        staleness = plane.discovery.staleness()
        yield GaugeMetricFamily(
            "mllambda_consul_staleness_seconds", "since the last good answer", value=min(staleness, 1e9)
        )


def status_json(
    plane: ControlPlane, traffic: list[VariantTraffic], history: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    return {
        "history": history,
        "traffic": [asdict(t) for t in traffic],
        "links": {"consul_ui": f"{plane.settings.consul.url}/ui/", "envoy_admin": plane.envoy_admin_urls()},
        "pipelines": [
            {"version": v.version, "created_at": v.created_at, "cause": v.cause, **pipeline_to_dict(v.pipeline)}
            for v in plane.pipelines
        ],
        "runtimes": [
            {"service_id": i.service_id, "model": i.model, "version": i.version, "passing": i.passing}
            for i in plane.discovery.instances()
        ],
        "envoys": [
            {
                "node": s.node_id,
                "type": s.type_url.rsplit(".", 1)[-1],
                "acked": s.acked_version,
                "nack_version": s.nack_version,
                "nack_error": s.nack_error,
                "connected": plane.status.is_connected(s.node_id),
            }
            for s in plane.status.all()
        ],
        "consul": {"reachable": plane.discovery.reachable, "errors": plane.discovery.errors},
        "kafka_bridges": [f"{host}:{port}" for host, port in plane.kafka_bridges()],
        "generated_at": time.time(),
    }


def render_dashboard(status: dict[str, Any]) -> str:
    e = html.escape
    parts = ["<h2>Pipelines</h2>"]
    for p in status["pipelines"]:
        about = f"v{p['version']} · {e(p['transport'])} · {e(p['cause'])}"
        parts.append(f"<h3>{e(p['name'])} <small>{about}</small></h3>")
        versions = status["history"].get(p["name"], [])
        shown = ", ".join(f"v{h['version']} ({e(h['cause'])}, {e(h['created_at'])})" for h in versions[-5:])
        parts.append(f"<p class='history'>history: {shown}</p><ol>")
        for stage in p["stages"]:
            groups = [("", stage.get("variants", []))] + [
                (f"branch {b['key']}: ", b["variants"]) for b in stage.get("branches", [])
            ]
            cells = []
            for label, variants in groups:
                total = sum(v["weight"] for v in variants) or 1
                shown = ", ".join(
                    f"{e(v['model'])}:{e(v['version'])} {100 * v['weight'] / total:.0f}%" for v in variants
                )
                cells.append(f"{e(label)}{shown}")
            shadow = stage.get("shadow")
            if shadow:
                cells.append(f"shadow {e(shadow['model'])}:{e(shadow['version'])} {shadow['percent']:g}%")
            parts.append(f"<li><b>{e(stage['name'])}</b>: {'; '.join(cells)}</li>")
        parts.append("</ol>")
    parts.append("<h2>Runtimes</h2><ul>")
    for r in status["runtimes"]:
        state = "passing" if r["passing"] else "critical"
        parts.append(f"<li>{e(r['service_id'])} ({e(r['model'])}:{e(r['version'])}) — {state}</li>")
    parts.append("</ul><h2>Traffic</h2>" + render_traffic(status["traffic"]))
    parts.append("<h2>Envoys</h2><table><tr><th>node</th><th>type</th><th>acked</th><th>NACK</th></tr>")
    for n in status["envoys"]:
        nack = f"{e(n['nack_version'])}: {e(n['nack_error'])}" if n["nack_error"] else ""
        parts.append(f"<tr><td>{e(n['node'])}</td><td>{e(n['type'])}</td><td>{e(n['acked'])}</td><td>{nack}</td></tr>")
    parts.append("</table>")
    consul = "reachable" if status["consul"]["reachable"] else "UNREACHABLE"
    links = status["links"]
    admin_links = " · ".join(f"<a href='{e(u)}'>{e(n)}</a>" for n, u in sorted(links["envoy_admin"].items()))
    parts.append(f"<p>Envoy admin: {admin_links}</p>")
    if status["kafka_bridges"]:
        parts.append(f"<p>Kafka bridges: {e(', '.join(status['kafka_bridges']))}</p>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='3'>"
        "<title>ML Lambda</title><style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;"
        "text-align:left}</style></head><body><h1>ML Lambda</h1>"
        f"<p>Consul: {consul} (<a href='{e(links['consul_ui'])}'>UI</a>) · <a href='/api/status'>JSON</a>"
        " · <a href='/metrics'>metrics</a></p>" + "".join(parts) + "</body></html>"
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render_traffic(rows: list[dict[str, Any]]) -> str:
    e = html.escape
    out = [
        "<table id='traffic'><tr><th>pipeline</th><th>stage</th><th>branch</th><th>variant</th><th>weight</th>"
        "<th>observed</th><th>requests</th><th>5xx</th><th>retries</th><th>p50 ms</th><th>p99 ms</th></tr>"
    ]
    for t in rows:
        errors = f"{100 * t['errors'] / t['requests']:.1f}%" if t["requests"] else "-"
        out.append(
            f"<tr><td>{e(t['pipeline'])}</td><td>{e(t['stage'])}</td><td>{e(t['branch'])}</td>"
            f"<td class='variant'>{e(t['model'])}:{e(t['version'])}</td><td>{_pct(t['configured_share'])}</td>"
            f"<td class='observed'>{_pct(t['observed_share'])}</td><td>{t['requests']}</td><td>{errors}</td>"
            f"<td>{t['retries']}</td>"
            f"<td>{_ms(t['p50_ms'])}</td><td>{_ms(t['p99_ms'])}</td></tr>"
        )
    return "".join(out) + "</table>"


def build_web_app(plane: ControlPlane) -> web.Application:
    registry = CollectorRegistry()
    collector = StateCollector(plane)
    registry.register(collector)

    async def metrics(request: web.Request) -> web.Response:
        collector.traffic = await plane.traffic_rows()
        return web.Response(body=generate_latest(registry), headers={"content-type": CONTENT_TYPE_LATEST})

    async def current() -> dict[str, Any]:
        history = {
            name: [{"version": v.version, "cause": v.cause, "created_at": v.created_at} for v in versions]
            for name, versions in plane.history.items()
        }
        return status_json(plane, await plane.traffic_rows(), history)

    async def api_status(request: web.Request) -> web.Response:
        return web.json_response(await current())

    async def dashboard(request: web.Request) -> web.Response:
        return web.Response(text=render_dashboard(await current()), content_type="text/html")

    async def bridge(request: web.Request) -> web.Response:
        """HTTP in, Kafka through the pipeline, HTTP out (the gateway routes Kafka pipelines here)."""
        name = request.match_info["pipeline"]
        pipeline = next((v.pipeline for v in plane.pipelines if v.pipeline.name == name), None)
        if plane.kafka is None or pipeline is None:
            return web.json_response({"error": f"no Kafka pipeline named {name!r}"}, status=404)
        body = await request.read()
        try:
            payload = json.loads(body)
        except ValueError as err:
            return web.json_response({"error": f"body is not valid JSON: {err}"}, status=400)
        if not isinstance(payload, dict):
            return web.json_response({"error": f"body must be a JSON object, got {type(payload).__name__}"}, status=400)
        timeout = sum(stage.timeout_ms for stage in pipeline.stages) / 1000
        status, result, served = await plane.kafka.call(name, body, timeout)
        headers = {"x-mll-served": served} if served else {}
        return web.Response(body=result, status=status, content_type="application/json", headers=headers)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")  # Consul's check on this control plane's Kafka bridge

    app = web.Application()
    app.router.add_post("/bridge/{pipeline}", bridge)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/status", api_status)
    app.router.add_get("/", dashboard)
    return app
