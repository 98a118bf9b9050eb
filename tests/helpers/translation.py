"""Plain data for translation tests: a pipeline, its runtimes, and routes as Envoy would read them."""

from __future__ import annotations

from typing import Any

from contract.service import RuntimeService
from controlplane.pipeline.model import Pipeline, PipelineVersion
from controlplane.pipeline.spec import parse_pipeline
from controlplane.translate.pipelines import Deployment
from controlplane.xds.snapshot import ROUTE, Snapshot


def instance(model: str, version: str, n: int, passing: bool = True, kafka_port: int = 0) -> RuntimeService:
    return RuntimeService(
        f"{model}-{version}-{n}",
        model,
        version,
        "127.0.0.1",
        passing=passing,
        runtime_port=7000 + n,
        runtime_uds=f"/run/{model}-{n}.sock",
        ingress_port=8000 + n,
        egress_port=9000 + n,
        egress_uds=f"/run/{model}-{n}-egress.sock",
        kafka_port=kafka_port,
    )


PIPELINE = parse_pipeline(
    {
        "name": "p",
        "stages": [
            {"name": "a", "variants": [{"model": "ma", "version": "v1"}], "timeout_ms": 1000},
            {
                "name": "b",
                "variants": [
                    {"model": "mb", "version": "v1", "weight": 90},
                    {"model": "mb", "version": "v2", "weight": 10},
                ],
                "shadow": {"model": "mb", "version": "v3", "percent": 5},
                "timeout_ms": 2000,
            },
            {
                "name": "c",
                "branch_on": "category",
                "branches": [{"key": "x", "variants": [{"model": "mx", "version": "v1"}]}],
                "timeout_ms": 3000,
            },
        ],
    }
)


RUNTIMES = [instance("ma", "v1", 1), instance("mb", "v1", 2), instance("mb", "v2", 3, passing=False)]


def at(pipeline: Pipeline, version: int = 1) -> PipelineVersion:
    return PipelineVersion(pipeline, version, "2026-01-01T00:00:00Z", "test")


def steady(*pipelines: Pipeline) -> list[Deployment]:
    return [Deployment.steady(at(p)) for p in pipelines]


def routes(snapshot: Snapshot, name: str) -> list[Any]:
    return list(snapshot.of_type(ROUTE).by_name[name].virtual_hosts[0].routes)


def entries(snapshot: Snapshot) -> list[Any]:
    """The gateway's routes that stream a request into a stage (not a 413 for a body over max_body, nor the
    copy that reads a chunked body whole first)."""
    return [
        route
        for route in routes(snapshot, "gateway")
        if route.HasField("route") and not any(m.name == "content-length" for m in route.match.headers)
    ]
