"""Envoy routes for one pipeline stage: into a sidecar's runtime, into the next stage (splits,
branches, retries, mirrors), and the fixed ones (readiness, not found). Pure: no I/O."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2, range_pb2
from google.protobuf import wrappers_pb2

from contract import fanout, oip
from contract import headers as h
from contract.fanout import FanOut
from contract.naming import CONTROL_PLANE_IDENTITY, stage_path
from contract.service import RuntimeService
from controlplane.pipeline.model import Member, Pipeline, PipelineVersion, Shadow, Stage, Variant
from controlplane.translate import resources as r
from controlplane.translate import security

LOCAL_HTTP = "local-http"  # a sidecar's cluster for its own runtime over TCP
LOCAL_UDS = "local-uds"  # ... over its Unix socket
ENVOY_ADMIN = "envoy-admin"  # a sidecar's cluster for its own admin port (read-only /stats, via the ingress)
LOCAL_HEALTH = "local-health"  # ... its readiness listener (a thread of its own, not its event loop)
RETRY_ON = "connect-failure,refused-stream,reset,retriable-headers"  # + the next hop's own 503s


def hops(v: PipelineVersion, runtime: RuntimeService, tls: str) -> tuple[list[rc.Route], list[rc.Route]]:
    """What a runtime's model version serves in `v`: routes into the runtime, and to where it sends."""
    p, me, ingress, egress = v.pipeline, runtime.cluster, [], []
    for k, stage in enumerate(p.stages):
        if stage.protocol == oip.PROTOCOL:  # its models answer; the sender sends on
            if me in {x.cluster for x in stage.all_variants()}:
                ingress.append(_admit(oip_stage_route(p, v.version, k, runtime, shadow=False), p, k, tls))
            if stage.shadow and stage.shadow.cluster == me:
                ingress.append(_admit(oip_stage_route(p, v.version, k, runtime, shadow=True), p, k, tls))
            continue
        if stage.shadow and stage.shadow.cluster == me:
            ingress.append(_admit(ingress_route(p, v.version, k, shadow=True), p, k, tls))
        if _sends_on(stage, me):
            ingress.append(_admit(ingress_route(p, v.version, k, shadow=False), p, k, tls))
            if k + 1 < len(p.stages):
                egress += entry_routes(p, v.version, k + 1)
        for m in stage.members:
            if me in {x.cluster for _, variants in m.groups() for x in variants}:
                ingress.append(_admit(member_route(p, v.version, k, m, shadow=False), p, k, tls))
            if m.shadow and m.shadow.cluster == me:
                ingress.append(_admit(member_route(p, v.version, k, m, shadow=True), p, k, tls))
    return ingress, egress


def _sends_on(stage: Stage, me: str) -> bool:
    """Whether `me` answers `stage` as the model whose output goes on: a variant, or an ensemble's join."""
    if stage.members:
        return stage.join is not None and stage.join.cluster == me
    return me in {x.cluster for x in stage.all_variants()}


def _admit(route: rc.Route, p: Pipeline, k: int, tls_dir: str) -> rc.Route:
    """Under mTLS, a stage's ingress route admits only the identities the graph says call it."""
    if tls_dir:
        route.typed_per_filter_config[security.RBAC_FILTER].CopyFrom(security.route_rbac(security.callers(p, k)))
    return route


def ingress_route(p: Pipeline, version: int, k: int, shadow: bool) -> rc.Route:
    """Sidecar -> its own runtime, telling the runtime where the output goes next."""
    stage = p.stages[k]
    if shadow:
        add = [r.header(h.STAGE, stage.name), r.header(h.TRANSPORT, p.transport), r.header(h.SHADOW, "1")]
        add += [r.header(h.AGREE, "1"), max_body(p)]
    else:
        add = steering(p, version, k)
    match = rc.RouteMatch(path=stage_path(p.name, version, stage.name))
    if shadow:
        # Envoy marks mirrored requests by appending "-shadow" to the host part of the authority.
        match.headers.append(
            rc.HeaderMatcher(name=":authority", string_match=string_pb2.StringMatcher(contains="-shadow"))
        )
    return _local_route(p, f"{p.name}/{stage.name}", match, add, p.timeout_ms(k))


def member_route(p: Pipeline, version: int, k: int, member: Member, shadow: bool) -> rc.Route:
    """Sidecar -> its own runtime, for one member of an ensemble: it answers and never forwards."""
    stage = p.stages[k]
    add = [r.header(h.STAGE, f"{stage.name}.{member.name}"), r.header(h.TRANSPORT, p.transport), max_body(p)]
    if stage.join is not None or member.shadow is not None:  # compared with the join or with its shadow
        add.append(r.header(h.AGREE, "1"))
    match = rc.RouteMatch(path=member_path(p, version, k, member))
    if shadow:
        add.append(r.header(h.SHADOW, "1"))
        match.headers.append(
            rc.HeaderMatcher(name=":authority", string_match=string_pb2.StringMatcher(contains="-shadow"))
        )
    return _local_route(p, f"{p.name}/{stage.name}/{member.name}", match, add, member.timeout_ms)


def oip_stage_route(p: Pipeline, version: int, k: int, me: RuntimeService, shadow: bool) -> rc.Route:
    """Sidecar -> its own model in an OIP stage: asked in OIP, it answers and never forwards.

    A server we do not run gets the request on its own OIP path; our runtime SDK
    reads the protocol headers. The sidecar names who answered, as our SDK does.
    """
    stage = p.stages[k]
    add = [r.header(h.STAGE, stage.name), r.header(h.TRANSPORT, p.transport), r.header(h.PROTOCOL, oip.PROTOCOL)]
    add += [r.header(h.OIP_MODEL, me.model), r.header(h.OIP_VERSION, me.version), max_body(p)]
    match = rc.RouteMatch(path=stage_path(p.name, version, stage.name))
    if shadow:
        add.append(r.header(h.SHADOW, "1"))
        match.headers.append(
            rc.HeaderMatcher(name=":authority", string_match=string_pb2.StringMatcher(contains="-shadow"))
        )
    route = _local_route(p, f"{p.name}/{stage.name}", match, add, p.timeout_ms(k))
    if me.oip_model:  # a server we do not run: TCP only, on its own OIP path
        route.route.cluster, route.route.prefix_rewrite = LOCAL_HTTP, oip.infer_path(me.oip_model)
    route.response_headers_to_add.append(r.header(h.SERVED, f"{stage.name}={me.model}:{me.version}"))
    return route


def _local_route(
    p: Pipeline, name: str, match: rc.RouteMatch, add: list[base_pb2.HeaderValueOption], timeout_ms: int
) -> rc.Route:
    local = LOCAL_UDS if p.transport == "uds" else LOCAL_HTTP
    return rc.Route(
        name=name,
        match=match,
        route=rc.RouteAction(cluster=local, timeout=r.millis(timeout_ms)),
        request_headers_to_add=add,
        request_headers_to_remove=list(h.STEERING),
    )


def steering(p: Pipeline, version: int, k: int) -> list[base_pb2.HeaderValueOption]:
    """What a runtime answering stage k (a variant, or an ensemble's join) is told: the stage, the transport,
    where its output goes. Its sidecar's ingress adds it; so does a sender delivering to it on the same host."""
    stage = p.stages[k]  # its answers are compared with the shadow's, or (a join) with the members'
    agree = [r.header(h.AGREE, "1")] if stage.shadow or (stage.members and stage.join) else []
    return [
        r.header(h.STAGE, p.stages[k].name),
        r.header(h.TRANSPORT, p.transport),
        *agree,
        max_body(p),
        *onward(p, version, k + 1),
    ]


def max_body(p: Pipeline) -> base_pb2.HeaderValueOption:
    """The pipeline's body limit, told to the runtime with each request (it refuses a bigger body with 413)."""
    return r.header(h.MAX_BODY, str(p.max_body))


def member_path(p: Pipeline, version: int, k: int, member: Member) -> str:
    return f"{stage_path(p.name, version, p.stages[k].name)}/{member.name}"


def onward(p: Pipeline, version: int, k: int) -> list[base_pb2.HeaderValueOption]:
    """Steering headers for the runtime that sends into stage k: where to, and for an ensemble whom to ask."""
    if k >= len(p.stages):
        return []
    stage = p.stages[k]
    if stage.protocol == oip.PROTOCOL:  # asked, then its answer goes on from the sender
        return [r.header(h.ASK, stage_path(p.name, version, stage.name)), *onward(p, version, k + 1)]
    if not stage.members:
        found = [r.header(h.NEXT, stage_path(p.name, version, stage.name))]
        return found + ([r.header(h.BRANCH_FIELD, stage.branch_on)] if stage.branches else [])
    fan = FanOut(
        stage_path(p.name, version, stage.name),
        tuple(fanout.Member(m.name, m.timeout_ms, m.required) for m in stage.members),
        stage.branch_on if any(m.branches for m in stage.members) else "",
    )
    found = [r.header(h.FANOUT_PATH, fan.path), r.header(h.FANOUT, fan.header_value())]
    if fan.branch_field:
        found.append(r.header(h.FANOUT_BRANCH_FIELD, fan.branch_field))
    if stage.join:  # the merged answers go to the join, which sends on
        return [*found, r.header(h.NEXT, fan.path)]
    return found + onward(p, version, k + 1)  # the sender sends the merged answers on itself


def entry_routes(p: Pipeline, version: int, k: int) -> list[rc.Route]:
    """A sender's egress routes into stage k: its split, or an ensemble's members and then its join."""
    stage = p.stages[k]
    path = stage_path(p.name, version, stage.name)
    if stage.protocol == oip.PROTOCOL:
        onward_routes = entry_routes(p, version, k + 1) if k + 1 < len(p.stages) else []
        return stage_routes(p, version, k, match_path=path, rewrite=None) + onward_routes
    if not stage.members:
        return stage_routes(p, version, k, match_path=path, rewrite=None)
    routes = []
    for m in stage.members:
        name, where = f"{p.name}/{stage.name}/{m.name}", member_path(p, version, k, m)
        routes += _split(p, k, name, m.groups(), where, None, m.timeout_ms, m.shadow)
    if stage.join:
        join = _split(p, k, f"{p.name}/{stage.name}", [("", (stage.join,))], path, None)
        return routes + _steered(join, steering(p, version, k))
    return routes + (entry_routes(p, version, k + 1) if k + 1 < len(p.stages) else [])


def stage_routes(p: Pipeline, version: int, k: int, match_path: str, rewrite: str | None) -> list[rc.Route]:
    """Routes into stage k: a weighted split, or one route per branch key.

    A plain stage's routes carry its steering headers (replacing any the request had),
    so that a runtime on the sender's own host can be sent to without its ingress.
    """
    stage = p.stages[k]
    routes = _split(p, k, f"{p.name}/{stage.name}", stage.groups(), match_path, rewrite, shadow=stage.shadow)
    return routes if stage.protocol == oip.PROTOCOL else _steered(routes, steering(p, version, k))


def _steered(routes: list[rc.Route], add: list[base_pb2.HeaderValueOption]) -> list[rc.Route]:
    for route in routes:
        if route.HasField("route"):
            route.request_headers_to_remove.extend(h.STEERING)
            route.request_headers_to_add.extend(add)
    return routes


def steered(route: rc.Route) -> bool:
    """Whether a route tells the runtime it reaches where its output goes (see `stage_routes`)."""
    return any(add.header.key == h.STAGE for add in route.request_headers_to_add)


def _split(
    p: Pipeline,
    k: int,
    name: str,
    groups: Sequence[tuple[str, Sequence[Variant]]],
    match_path: str,
    rewrite: str | None,
    timeout_ms: int = 0,
    shadow: Shadow | None = None,
) -> list[rc.Route]:
    """A weighted split, or one route per branch key and a 422 for any other key."""
    stage = p.stages[k]
    routes = [
        _split_route(p, k, name, variants, match_path, rewrite, key or None, timeout_ms or p.timeout_ms(k), shadow)
        for key, variants in groups
    ]
    if groups and groups[0][0] == "":
        return routes
    keys = ", ".join(key for key, _ in groups)
    body = {"error": f"stage {stage.name!r}: no branch for this routing key", "field": stage.branch_on}
    routes.append(
        rc.Route(
            name=name,
            match=rc.RouteMatch(path=match_path),
            direct_response=rc.DirectResponseAction(status=422, body=_inline(json.dumps({**body, "known_keys": keys}))),
        )
    )
    return routes


def _split_route(
    p: Pipeline,
    k: int,
    name: str,
    variants: Sequence[Variant],
    match_path: str,
    rewrite: str | None,
    branch_key: str | None,
    timeout_ms: int,
    shadow: Shadow | None,
) -> rc.Route:
    stage = p.stages[k]
    action = rc.RouteAction(
        timeout=r.millis(timeout_ms),
        retry_policy=retry_policy(stage.retry.attempts, stage.retry.per_try_timeout_ms),
        request_mirror_policies=_mirror(shadow),
    )
    if rewrite:
        action.prefix_rewrite = rewrite
    r.set_clusters(action, [(v.cluster, v.weight) for v in variants if v.weight > 0])
    match = rc.RouteMatch(path=match_path)
    if branch_key is not None:
        match.headers.append(rc.HeaderMatcher(name=h.BRANCH, string_match=string_pb2.StringMatcher(exact=branch_key)))
    return rc.Route(name=name, match=match, route=action)


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


def _mirror(shadow: Shadow | None) -> list[rc.RouteAction.RequestMirrorPolicy]:
    if shadow is None:
        return []
    fraction = percent_pb2.FractionalPercent(
        numerator=round(shadow.percent * 10_000), denominator=percent_pb2.FractionalPercent.MILLION
    )
    return [
        rc.RouteAction.RequestMirrorPolicy(
            cluster=shadow.cluster,
            runtime_fraction=base_pb2.RuntimeFractionalPercent(default_value=fraction),
        )
    ]


def _inline(text: str) -> base_pb2.DataSource:
    return base_pb2.DataSource(inline_string=text)


def readiness_route(cluster: str = LOCAL_HTTP, oip_model: str = "") -> rc.Route:
    """Consul's health check goes through the sidecar: passing means Envoy and model are ready.

    A server we do not run is asked OIP's own question: is this model ready.
    """
    action = rc.RouteAction(cluster=cluster, timeout=r.millis(1000))
    if oip_model:
        action.prefix_rewrite = f"/v2/models/{oip_model}/ready"
    return rc.Route(name="readyz", match=rc.RouteMatch(path="/readyz"), route=action)


def stats_route() -> rc.Route:
    """GET /stats on an mTLS ingress, for the control plane's identity only: how it reads an Envoy's counters
    on another host (Envoy's admin stays on loopback: it can also change and stop the Envoy)."""
    return _control_planes_only("envoy-stats", "/stats", ENVOY_ADMIN)


def profiles_route() -> rc.Route:
    """GET /profiles on an mTLS ingress, for the control plane's identity only: how its model monitoring reads
    the runtime's profiles on another host (the runtime's own port stays on loopback)."""
    return _control_planes_only("runtime-profiles", "/profiles", LOCAL_HTTP)


def admission_route() -> rc.Route:
    """GET /admission on an mTLS ingress, for the control plane's identity only: the runtime's admission counts
    per caller key, read by the control plane on another host (`mllambda status`)."""
    return _control_planes_only("runtime-admission", "/admission", LOCAL_HTTP)


def _control_planes_only(name: str, path: str, cluster: str) -> rc.Route:
    get = [rc.HeaderMatcher(name=":method", string_match=string_pb2.StringMatcher(exact="GET"))]
    action = rc.RouteAction(cluster=cluster, timeout=r.millis(2000))
    route = rc.Route(name=name, match=rc.RouteMatch(path=path, headers=get), route=action)  # path: query aside
    route.typed_per_filter_config[security.RBAC_FILTER].CopyFrom(security.route_rbac([CONTROL_PLANE_IDENTITY]))
    return route


def oip_model_routes(
    model: str, version: str, inputs: Sequence[dict[str, Any]] = (), outputs: Sequence[dict[str, Any]] = ()
) -> list[rc.Route]:
    """Open Inference Protocol: a pipeline's model metadata and readiness, answered by the gateway itself."""
    get = [rc.HeaderMatcher(name=":method", string_match=string_pb2.StringMatcher(exact="GET"))]
    about = json.dumps(oip.metadata(model, version, inputs, outputs))
    return [
        _answer(f"{model}/oip-metadata", rc.RouteMatch(path=f"/v2/models/{model}", headers=get), 200, about),
        _answer(f"{model}/oip-ready", rc.RouteMatch(path=f"/v2/models/{model}/ready", headers=get), 200, ""),
    ]


def oip_server_routes() -> list[rc.Route]:
    """Open Inference Protocol: the server's liveness, readiness and metadata (the gateway is up: it answers)."""
    about = json.dumps({"name": "mllambda", "version": "1", "extensions": []})
    found = [_answer("oip-server", rc.RouteMatch(path="/v2"), 200, about)]
    return found + [_answer("oip-health", rc.RouteMatch(path=f"/v2/health/{x}"), 200, "") for x in ("live", "ready")]


BUFFER_FILTER = "envoy.filters.http.buffer"  # on the gateway, off but where a route turns it on
_LENGTH = "content-length"


def body_limited(p: Pipeline, entries: Sequence[rc.Route]) -> list[rc.Route]:
    """A pipeline's way in, guarded by its max_body before any stage sees a byte: a request whose Content-Length
    is over it is a 413 at once; one without (chunked) is read whole at the gateway (Envoy's buffer filter, up to
    max_body, then a 413) and then sent on; the rest stream through as before."""
    why = json.dumps(
        {
            "error": f"the request body is over the max_body of pipeline {p.name} ({p.max_body} bytes)",
            "code": 413,
            "max_body": p.max_body,
        }
    )
    over = rc.HeaderMatcher(name=_LENGTH, range_match=range_pb2.Int64Range(start=p.max_body + 1, end=2**62))
    paths = list(dict.fromkeys(route.match.path for route in entries))
    guarded = [_answer(f"{p.name}/too-large", rc.RouteMatch(path=path, headers=[over]), 413, why) for path in paths]
    read_whole = r.pack(buffer_pb2.BufferPerRoute(buffer=buffer_pb2.Buffer(max_request_bytes=_u32(p.max_body))))
    for route in entries:
        chunked = rc.Route()
        chunked.CopyFrom(route)
        chunked.match.headers.append(rc.HeaderMatcher(name=_LENGTH, present_match=False))
        chunked.typed_per_filter_config[BUFFER_FILTER].CopyFrom(read_whole)
        guarded.append(chunked)
    return guarded + list(entries)


def _u32(value: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=value)


def _answer(name: str, match: rc.RouteMatch, status: int, body: str) -> rc.Route:
    action = rc.DirectResponseAction(status=status, body=_inline(body) if body else None)
    return rc.Route(name=name, match=match, direct_response=action)


def not_found_route() -> rc.Route:
    body = json.dumps({"error": "no such pipeline; `mllambda get pipelines` lists them"})
    return rc.Route(
        name="not-found",
        match=rc.RouteMatch(prefix="/"),
        direct_response=rc.DirectResponseAction(status=404, body=_inline(body)),
    )


def dedupe(routes: list[rc.Route]) -> list[rc.Route]:
    """A sidecar serving one stage for two variants needs each egress route once."""
    seen, unique = set(), []
    for route in routes:
        key = route.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            unique.append(route)
    return unique
