"""Observed traffic from Envoy stats: pure parsing, merging and per-variant shares."""

from __future__ import annotations

from typing import Any

from controlplane.delivery.traffic import ClusterStats, merge, parse_envoy_stats, per_variant
from controlplane.pipeline.spec import parse_pipeline


def envoy_stats(cluster: str, total: int, five_xx: int, retries: int, p50: float, p99: float) -> dict[str, Any]:
    """The shape of Envoy's `/stats?format=json` for one cluster."""
    return {
        "stats": [
            {"name": f"cluster.{cluster}.upstream_rq_total", "value": total},
            {"name": f"cluster.{cluster}.upstream_rq_5xx", "value": five_xx},
            {"name": f"cluster.{cluster}.upstream_rq_retry", "value": retries},
            {"name": "http.ingress.downstream_rq_total", "value": 999},
            {
                "histograms": {
                    "supported_quantiles": [50, 99],
                    "computed_quantiles": [
                        {
                            "name": f"cluster.{cluster}.upstream_rq_time",
                            "values": [{"cumulative": p50}, {"cumulative": p99, "interval": p99 / 2}],
                        }
                    ],
                }
            },
        ]
    }


def test_envoy_stats_become_counts_retries_and_quantiles_per_cluster() -> None:
    parsed = parse_envoy_stats(envoy_stats("score.v1", 120, 3, 2, 1.5, 9.0))
    assert parsed == {"score.v1": ClusterStats(120, 3, p50_ms=1.5, p99_ms=9.0, retries=2, p99_recent_ms=4.5)}
    assert parse_envoy_stats(envoy_stats("score_v1", 1, 0, 0, 1.0, 2.0)).keys() == {"score.v1"}  # Envoy's stat name


def test_merging_envoys_sums_counts_and_weights_latency_by_requests() -> None:
    gateway = parse_envoy_stats(envoy_stats("a.v1", 100, 1, 4, 2.0, 10.0))
    sidecar = parse_envoy_stats(envoy_stats("a.v1", 300, 2, 1, 4.0, 20.0))
    assert merge([gateway, sidecar]) == {"a.v1": ClusterStats(400, 3, 3.5, 17.5, 5, 8.75)}


def test_observed_share_is_per_split_group_and_the_shadow_is_measured_against_its_stage() -> None:
    pipeline = parse_pipeline(
        {
            "name": "p",
            "stages": [
                {
                    "name": "s",
                    "variants": [
                        {"model": "m", "version": "v1", "weight": 90},
                        {"model": "m", "version": "v2", "weight": 10},
                    ],
                    "shadow": {"model": "m", "version": "v3", "percent": 20},
                }
            ],
        }
    )
    stats = {"m.v1": ClusterStats(880, retries=7), "m.v2": ClusterStats(120, errors=6), "m.v3": ClusterStats(200)}
    rows = {(r.version, r.branch): r for r in per_variant([pipeline], stats)}
    assert rows["v1", ""].observed_share == 0.88 and rows["v1", ""].configured_share == 0.9
    assert rows["v1", ""].retries == 7
    assert (rows["v2", ""].observed_share, rows["v2", ""].errors) == (0.12, 6)
    assert rows["v3", "(shadow)"].observed_share == 0.2 and rows["v3", "(shadow)"].configured_share == 0.2


def test_envoys_on_this_host_are_read_at_their_admin_port_and_others_through_their_mtls_ingress() -> None:
    from contract.service import RuntimeService
    from controlplane.delivery.traffic import STATS, stats_urls

    def runtime(host: str, tls: str = "") -> RuntimeService:
        return RuntimeService(f"m-{host}", "m", "v1", host, 1, "", 15001, 15002, "", 19000, tls_dir=tls)

    here, there, open_there = runtime("127.0.0.1"), runtime("10.0.0.7", "/certs"), runtime("10.0.0.8")
    assert stats_urls([here, there, open_there], 19999, secure=True) == [
        f"http://127.0.0.1:19999{STATS}",
        f"http://127.0.0.1:19000{STATS}",
        f"https://10.0.0.7:15001{STATS}",
    ]
    assert stats_urls([there], 0, secure=False) == []  # without our own identity nothing there would admit us
