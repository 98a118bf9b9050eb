"""Prometheus /metrics of the control plane, read from live state at scrape time.

A custom collector over a `PlaneView`, so there is no second copy of the truth
to keep in sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from controlplane.delivery.rollouts import spots, where
from controlplane.delivery.traffic import VariantTraffic
from controlplane.view import PlaneReader, PlaneView
from controlplane.xds.snapshot import short


class StateCollector(Collector):
    def __init__(self, view: Callable[[], PlaneView]) -> None:
        self.view = view
        self.traffic: list[VariantTraffic] = []  # refreshed by the /metrics handler before each scrape

    def collect(self) -> Iterator[Metric]:
        view = self.view()
        yield from _xds(view)
        yield from _monitoring(view)
        limited = CounterMetricFamily(
            "mllambda_pipeline_rate_limited", "requests its rate_limit refused at the gateway", labels=["pipeline"]
        )
        for pipeline, count in view.rate_limited().items():
            limited.add_metric([pipeline], count)
        yield limited
        admin = CounterMetricFamily("mllambda_admin_requests", "admin API calls", labels=["method", "code"])
        for (method, code), count in view.admin_calls.items():
            admin.add_metric([method, code], count)
        yield admin
        pipelines = GaugeMetricFamily("mllambda_pipeline_version", "current version", labels=["pipeline"])
        for version in view.pipelines:
            pipelines.add_metric([version.pipeline.name], version.version)
        yield pipelines
        entry = GaugeMetricFamily("mllambda_pipeline_entry_version", "version new requests enter", labels=["pipeline"])
        pending = GaugeMetricFamily(
            "mllambda_pipeline_pending_seconds", "how long a newer version waits for its hops", labels=["pipeline"]
        )
        for name, s in view.switch.items():
            if s.get("entry"):
                entry.add_metric([name], s["entry"])
            pending.add_metric([name], s.get("pending_seconds") or 0)
        yield entry
        yield pending
        broken = GaugeMetricFamily("mllambda_store_broken_records", "pipelines with a record that was skipped")
        broken.add_metric([], len(view.broken))
        yield broken
        restarts = CounterMetricFamily(
            "mllambda_kafka_router_restarts", "Kafka entry routers started again", labels=["pipeline"]
        )
        for name, count in view.kafka_router_restarts.items():
            restarts.add_metric([name], count)
        yield restarts
        yield GaugeMetricFamily(
            "mllambda_rollout_driving", "1 while this control plane drives rollouts", value=int(view.rollouts_driving)
        )
        yield CounterMetricFamily(
            "mllambda_rollout_moves", "rollout steps, promotions and rollbacks written here", value=view.rollout_moves
        )
        share = GaugeMetricFamily(
            "mllambda_rollout_candidate_percent",
            "the share of its split a rollout's candidate gets now (0: not begun)",
            labels=["pipeline", "stage", "branch", "candidate"],
        )
        for current in view.pipelines:
            for spot in spots(current.pipeline):
                _, r = where(current.pipeline, spot)
                assert r is not None
                stage = current.pipeline.stages[spot[0]].name
                percent = r.steps[r.step - 1] if r.step else 0
                share.add_metric([current.pipeline.name, stage, spot[1], r.candidate.cluster], percent)
        yield share
        yield GaugeMetricFamily(
            "mllambda_translate_failed_groups",
            "node groups whose translation failed (they keep their last config)",
            value=len(view.translate_failed),
        )
        yield GaugeMetricFamily(
            "mllambda_consul_reachable", "discovery reaches Consul", value=int(view.consul.reachable)
        )
        yield CounterMetricFamily("mllambda_consul_watch_errors", "failed Consul queries", value=view.consul.errors)
        yield GaugeMetricFamily(
            "mllambda_discovery_holding",
            "1 while the last runtimes are held because every one vanished at once",
            value=int(view.consul.holding_since is not None),
        )
        yield GaugeMetricFamily(
            "mllambda_pipelines_holding",
            "1 while the pipelines served are held because every one vanished from Consul KV at once",
            value=int(view.pipelines_held_since is not None),
        )
        yield CounterMetricFamily(
            "mllambda_discovery_held_drops", "times every runtime vanished at once", value=view.consul.held_drops
        )
        yield GaugeMetricFamily(
            "mllambda_discovery_refused_registrations", "registrations ignored", value=len(view.consul.refused)
        )
        yield from _traffic(self.traffic)
        yield GaugeMetricFamily(
            "mllambda_consul_staleness_seconds", "since the last good answer", value=min(view.consul.staleness, 1e9)
        )


def _xds(view: PlaneView) -> Iterator[Metric]:
    connected = GaugeMetricFamily("mllambda_xds_connected_streams", "open ADS streams", labels=["mode"])
    for mode, count in view.streams_by_mode.items():
        connected.add_metric([mode], count)
    yield connected
    acks = CounterMetricFamily("mllambda_xds_acks", "ACKs received", labels=["node", "type"])
    nacks = CounterMetricFamily("mllambda_xds_nacks", "NACKs received", labels=["node", "type"])
    for s in view.acks:
        acks.add_metric([s.node_id, short(s.type_url)], s.acks)
        nacks.add_metric([s.node_id, short(s.type_url)], s.nacks)
    yield acks
    yield nacks
    pushes = CounterMetricFamily("mllambda_xds_snapshots_set", "snapshots set per node group", labels=["group"])
    for group, count in view.snapshots_set.items():
        pushes.add_metric([group], count)
    yield pushes
    yield view.push_latency.family("mllambda_xds_push_seconds", "snapshot set -> ACK, per node and type")
    info = GaugeMetricFamily("mllambda_snapshot_info", "current snapshot per node group", labels=["group", "version"])
    for group, version in view.snapshot_versions.items():
        info.add_metric([group, version], 1)
    yield info


def _traffic(rows: list[VariantTraffic]) -> Iterator[Metric]:
    labels = ["pipeline", "stage", "branch", "model", "version"]
    requests = CounterMetricFamily("mllambda_variant_requests", "requests a variant received", labels=labels)
    errors = CounterMetricFamily("mllambda_variant_errors", "5xx answers from a variant", labels=labels)
    retries = CounterMetricFamily("mllambda_variant_retries", "retried requests to a variant", labels=labels)
    refused = CounterMetricFamily(
        "mllambda_variant_refused", "429 and 503 answers from a variant (its admission refused them)", labels=labels
    )
    observed = GaugeMetricFamily("mllambda_variant_observed_share", "share of its split group", labels=labels)
    configured = GaugeMetricFamily("mllambda_variant_configured_share", "weight share", labels=labels)
    for t in rows:
        key = [t.pipeline, t.stage, t.branch, t.model, t.version]
        requests.add_metric(key, t.requests)
        errors.add_metric(key, t.errors)
        retries.add_metric(key, t.retries)
        refused.add_metric(key, t.refused)
        configured.add_metric(key, t.configured_share)
        if t.observed_share is not None:
            observed.add_metric(key, t.observed_share)
    yield from (requests, errors, retries, refused, observed, configured)


def metrics_handler(reader: PlaneReader) -> Callable[[web.Request], Any]:
    registry = CollectorRegistry()
    collector = StateCollector(reader.view)
    registry.register(collector)

    async def metrics(request: web.Request) -> web.Response:
        collector.traffic = await reader.traffic()
        return web.Response(body=generate_latest(registry), headers={"content-type": CONTENT_TYPE_LATEST})

    return metrics


def _monitoring(view: PlaneView) -> Iterator[Metric]:
    """Model monitoring: per model version and field, drift against its baseline (bounded: the fields a
    runtime profiles, MAX_FIELDS a side)."""
    where = ["model", "version", "side", "field", "of"]
    psi = GaugeMetricFamily("mllambda_model_drift_psi", "population stability index against the baseline", labels=where)
    distance = GaugeMetricFamily(
        "mllambda_model_drift_distance",
        "Kolmogorov-Smirnov (numbers, lengths) or total variation (categories) against the baseline",
        labels=[*where, "measure"],
    )
    threshold = GaugeMetricFamily(
        "mllambda_model_drift_threshold", "PSI above which a field has drifted", labels=["model", "version"]
    )
    profiled = GaugeMetricFamily(
        "mllambda_model_profiled_requests", "profiled requests in the last minute", labels=["model", "version"]
    )
    agree = GaugeMetricFamily(
        "mllambda_model_agreement",
        "share of requests a shadow answered as the version it shadows, per field",
        labels=["model", "version", "against", "field"],
    )
    pairs = GaugeMetricFamily(
        "mllambda_model_agreement_pairs", "requests both answered", labels=["model", "version", "against", "field"]
    )
    for row in view.monitoring():
        for a in row.get("agreement", []):
            agree.add_metric([row["model"], row["version"], a["against"], a["field"]], a["agreement"])
            pairs.add_metric([row["model"], row["version"], a["against"], a["field"]], a["pairs"])
        m, v = row["model"], row["version"]
        profiled.add_metric([m, v], row["requests"])
        if row["baseline"]:
            threshold.add_metric([m, v], row["baseline"]["threshold"])
        for d in row["drift"]:
            psi.add_metric([m, v, d["side"], d["field"], d["of"]], d["psi"])
            distance.add_metric([m, v, d["side"], d["field"], d["of"], d["measure"]], d["distance"])
    yield from (psi, distance, threshold, profiled, agree, pairs)
