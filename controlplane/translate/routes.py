"""Envoy routes for one pipeline stage: into a sidecar's runtime, into the next stage (splits,
branches, retries, mirrors), and the fixed ones (readiness, not found). Pure: no I/O."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import wrappers_pb2

from contract import headers as h
from contract.naming import stage_path
from controlplane.model import Pipeline, Stage, Variant
from controlplane.translate import resources as r

LOCAL_HTTP = "local-http"  # a sidecar's cluster for its own runtime over TCP
LOCAL_UDS = "local-uds"  # ... over its Unix socket
LOCAL_HEALTH = "local-health"  # ... its readiness listener (a thread of its own, not its event loop)
RETRY_ON = "connect-failure,refused-stream,reset,retriable-headers"  # + the next hop's own 503s


def ingress_route(p: Pipeline, version: int, k: int, shadow: bool) -> rc.Route:
    """Sidecar -> its own runtime, telling the runtime where the output goes next."""
    stage = p.stages[k]
    add = [r.header(h.STAGE, stage.name), r.header(h.TRANSPORT, p.transport)]
    if shadow:
        add.append(r.header(h.SHADOW, "1"))
    elif k + 1 < len(p.stages):
        following = p.stages[k + 1]
        add.append(r.header(h.NEXT, stage_path(p.name, version, following.name)))
        if following.branches:
            add.append(r.header(h.BRANCH_FIELD, following.branch_on))
    match = rc.RouteMatch(path=stage_path(p.name, version, stage.name))
    if shadow:
        # Envoy marks mirrored requests by appending "-shadow" to the host part of the authority.
        match.headers.append(
            rc.HeaderMatcher(name=":authority", string_match=string_pb2.StringMatcher(contains="-shadow"))
        )
    local = LOCAL_UDS if p.transport == "uds" else LOCAL_HTTP
    return rc.Route(
        name=f"{p.name}/{stage.name}",
        match=match,
        route=rc.RouteAction(cluster=local, timeout=r.millis(p.timeout_ms(k))),
        request_headers_to_add=add,
        request_headers_to_remove=list(h.STEERING),
    )


def stage_routes(p: Pipeline, k: int, match_path: str, rewrite: str | None) -> list[rc.Route]:
    """Routes into stage k: a weighted split, or one route per branch key."""
    stage = p.stages[k]
    if not stage.branches:
        return [_split_route(p, k, stage.variants, match_path, rewrite, None)]
    routes = [_split_route(p, k, b.variants, match_path, rewrite, b.key) for b in stage.branches]
    keys = ", ".join(b.key for b in stage.branches)
    routes.append(
        rc.Route(
            name=f"{p.name}/{stage.name}",
            match=rc.RouteMatch(path=match_path),
            direct_response=rc.DirectResponseAction(
                status=422,
                body=_inline(
                    json.dumps(
                        {
                            "error": f"stage {stage.name!r}: no branch for this routing key",
                            "field": stage.branch_on,
                            "known_keys": keys,
                        }
                    )
                ),
            ),
        )
    )
    return routes


def _split_route(
    p: Pipeline,
    k: int,
    variants: Sequence[Variant],
    match_path: str,
    rewrite: str | None,
    branch_key: str | None,
) -> rc.Route:
    stage = p.stages[k]
    action = rc.RouteAction(
        timeout=r.millis(p.timeout_ms(k)),
        retry_policy=retry_policy(stage.retry.attempts, stage.retry.per_try_timeout_ms),
        request_mirror_policies=_mirror(stage),
    )
    if rewrite:
        action.prefix_rewrite = rewrite
    r.set_clusters(action, [(v.cluster, v.weight) for v in variants if v.weight > 0])
    match = rc.RouteMatch(path=match_path)
    if branch_key is not None:
        match.headers.append(rc.HeaderMatcher(name=h.BRANCH, string_match=string_pb2.StringMatcher(exact=branch_key)))
    return rc.Route(name=f"{p.name}/{stage.name}", match=match, route=action)


def retry_policy(attempts: int, per_try_timeout_ms: int = 0) -> rc.RetryPolicy:
    policy = rc.RetryPolicy(
        retry_on=RETRY_ON,
        num_retries=wrappers_pb2.UInt32Value(value=attempts),
        retriable_headers=[rc.HeaderMatcher(name=h.RETRIABLE, present_match=True)],
        # A retry goes to another instance when there is one.
        retry_host_predicate=[
            rc.RetryPolicy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=r.pack(previous_hosts_pb2.PreviousHostsPredicate()),
            )
        ],
        host_selection_retry_max_attempts=3,
    )
    if per_try_timeout_ms:
        policy.per_try_timeout.CopyFrom(r.millis(per_try_timeout_ms))
    return policy


def _mirror(stage: Stage) -> list[rc.RouteAction.RequestMirrorPolicy]:
    if stage.shadow is None:
        return []
    fraction = percent_pb2.FractionalPercent(
        numerator=round(stage.shadow.percent * 10_000), denominator=percent_pb2.FractionalPercent.MILLION
    )
    return [
        rc.RouteAction.RequestMirrorPolicy(
            cluster=stage.shadow.cluster,
            runtime_fraction=base_pb2.RuntimeFractionalPercent(default_value=fraction),
        )
    ]


def _inline(text: str) -> Any:
    return base_pb2.DataSource(inline_string=text)


def readiness_route(cluster: str = LOCAL_HTTP) -> rc.Route:
    """Consul's health check goes through the sidecar: passing means Envoy and model are ready."""
    return rc.Route(
        name="readyz",
        match=rc.RouteMatch(path="/readyz"),
        route=rc.RouteAction(cluster=cluster, timeout=r.millis(1000)),
    )


def not_found_route() -> rc.Route:
    body = json.dumps({"error": "no such pipeline; `mllambda get pipelines` lists them"})
    return rc.Route(
        name="not-found",
        match=rc.RouteMatch(prefix="/"),
        direct_response=rc.DirectResponseAction(status=404, body=_inline(body)),
    )
