"""Pipeline deployments + discovered runtimes -> one Envoy snapshot per node group. Pure: no I/O.

The data path, for version N of pipeline P with stages S0..Sn:
  client -> gateway `/pipelines/P` --(weighted S0 clusters)--> sidecar ingress `/pipelines/P/vN/S0`
  -> runtime (TCP or Unix socket, by transport) -> runtime posts its output to its
  sidecar's egress `/pipelines/P/vN/S1` --(S1 clusters, branches, mirror)--> next sidecar ...
Each ingress route tells the runtime, in headers, the path of the next hop; the
last stage gets none and answers. Cluster `<model>.<version>` holds the sidecar
ingress addresses of that version's passing instances; for a sender on their
host, their runtimes' sockets instead, its route saying what the ingress would
(endpoints.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2 as rate_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2, token_bucket_pb2
from google.protobuf import wrappers_pb2

from contract import headers as h
from contract import oip
from contract.naming import BRIDGE_SERVICE, bridge_path, pipeline_path, stage_path
from contract.payload import MAX_BODY_CEILING
from contract.service import RuntimeService, shared_egress_socket
from controlplane.pipeline.model import Pipeline, PipelineVersion, RateLimit, Stage
from controlplane.translate import resources as r
from controlplane.translate import security
from controlplane.translate.endpoints import Endpoints, Reach, endpoints_of, only_serving, remote_clusters
from controlplane.translate.routes import (
    BUFFER_FILTER,
    ENVOY_ADMIN,
    LOCAL_HEALTH,
    LOCAL_HTTP,
    LOCAL_UDS,
    admission_route,
    body_limited,
    dedupe,
    hops,
    not_found_route,
    oip_model_routes,
    oip_server_routes,
    profiles_route,
    readiness_route,
    retry_policy,
    stage_routes,
    stats_route,
)
from controlplane.translate.shared import Carrier, not_carried_here, shared_egress, shares_egress
from controlplane.xds.snapshot import Snapshot, route_clusters

BRIDGE = "mll-kafka-bridge"
FRONT = "mll-oip-grpc"  # the control planes' OIP gRPC fronts (controlplane/edge/front.py)
OIP_GRPC_PREFIX = "/inference.GRPCInferenceService/"
FRONT_TIMEOUT_MS = 300_000  # a gRPC call's own deadline (grpc-timeout) is kept when it is shorter
BRIDGE_RETRIES = 3
KAFKA = "kafka-broker"
SERVED_TRANSPORTS = ("http", "uds")  # kafka pipelines are carried by topics, not routes
# The buffer filter, off unless a route turns it on (a pipeline's chunked requests: routes.body_limited)
BUFFERING = (BUFFER_FILTER, buffer_pb2.Buffer(max_request_bytes=wrappers_pb2.UInt32Value(value=MAX_BODY_CEILING)))
# Envoy's local rate limit, off but where a pipeline with a rate_limit turns it on (`rate_limited`)
RATE_FILTER = "envoy.filters.http.local_ratelimit"
RATE_LIMITING = (RATE_FILTER, rate_pb2.LocalRateLimit(stat_prefix="rate_limit"))
REPLAY = "x-mll-replay"  # a replay's secret: only requests that carry it enter its candidate (never live traffic)


@dataclass(frozen=True)
class Options:
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 18080
    gateway_group: str = "gateway"
    bridges: tuple[tuple[str, int], ...] = ()  # every control plane's Kafka bridge; none: no route for Kafka pipelines
    fronts: tuple[tuple[str, int], ...] = ()  # every control plane's OIP gRPC front; none: no gRPC route
    kafka_broker: tuple[str, int] | None = None  # sidecars proxy runtimes' broker traffic here
    kafka_filter_nodes: frozenset[str] = frozenset()  # Envoys that report the contrib kafka_broker filter
    mtls: bool = False  # every hop mutually authenticated; a stage admits only its callers (security.py)
    gateway_tls_dir: str = ""  # with mtls: the gateway Envoy's certificate folder
    parked: tuple[tuple[str, str, int], ...] = ()  # (cluster, host, port): a scaled-to-zero version's activator
    # a runtime on the sender's host: "shared" (its output too through the gateway Envoy), "direct" to its
    # socket, or "ingress" (its sidecar) (docs/architecture.md, "Same host")
    colocated: str = "shared"
    run_folder: str = ""  # shared: the gateway takes the output of runtimes whose egress socket is in this folder
    # (model cluster, its signature as JSON) for saved models: a pipeline's OIP metadata names its inputs and outputs
    signatures: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Deployment:
    """One pipeline on the data path.

    `entry` is the version the gateway sends new requests into (None: no entry,
    the pipeline is deleted or its first version is not ready yet); `routed` is
    every version whose hops the sidecars keep: the entry, a newer one waiting to
    take over, and older ones draining their in-flight requests.
    """

    entry: PipelineVersion | None
    routed: tuple[PipelineVersion, ...]
    # (candidate, secret): a replay's version, entered at the gateway only by requests carrying the secret
    # in `x-mll-replay`; its hops are in `routed` like a pending version's (controlplane/delivery/replays.py)
    trials: tuple[tuple[PipelineVersion, str], ...] = ()

    @classmethod
    def steady(cls, version: PipelineVersion) -> Deployment:
        return cls(version, (version,))

    def hops(self) -> tuple[PipelineVersion, ...]:
        """Every version whose hops the sidecars get: the routed ones and the trials."""
        return (*self.routed, *(v for v, _ in self.trials))


Carried = frozenset[tuple[str, int]]  # (pipeline, version) pairs whose routes a snapshot holds


Memo = dict[Hashable, dict[Hashable, Snapshot]]  # what a model version's sidecars depend on -> per sidecar


def translate(
    deployments: Sequence[Deployment],
    instances: Sequence[RuntimeService],
    options: Options = Options(),
    failed: dict[str, str] | None = None,
    memo: Memo | None = None,
) -> dict[str, Snapshot]:
    """A snapshot per node group.

    With `failed`, a group whose translation raises is left out and its error
    recorded there (the others are unaffected); without it, the error propagates.
    With `memo` (a cache the caller keeps between calls), a sidecar whose inputs
    did not change gets its earlier snapshot back instead of a rebuilt one: with
    thousands of runtimes, one registration rebuilds only the sidecars that
    route to its model version. The inputs are compared once per model version.
    """
    endpoints = endpoints_of(instances, options.parked)
    everything = [v for d in deployments for v in d.hops()]
    routed = [v for v in everything if v.pipeline.transport in SERVED_TRANSPORTS]
    snapshots: dict[str, Snapshot] = {}
    serving = _served_by(routed)
    sharing = (
        shares_egress(instances, options.gateway_host, options.run_folder) if options.colocated == "shared" else []
    )
    carriers = [(i, serving.get(i.cluster, ())) for i in sharing]  # a listener for each, serving or not
    _isolated(
        options.gateway_group,
        snapshots,
        failed,
        lambda: _gateway(
            _entries(deployments, options), everything, endpoints, options, carriers, _trials(deployments)
        ),
    )
    kept: Memo = {}
    by_cluster: dict[str, list[RuntimeService]] = {}
    for i in instances:
        by_cluster.setdefault(i.cluster, []).append(i)
    for cluster, members in by_cluster.items():
        mine = serving.get(cluster, ())
        shared = _shared_key(mine, endpoints.reach)
        known = memo.get(shared, {}) if memo is not None else {}
        fresh = kept.setdefault(shared, {})
        for i in members:
            own = (i, options.kafka_broker, i.service_id in options.kafka_filter_nodes) if i.kafka_port else i
            snapshot = known.get(own)
            if snapshot is None:
                snapshot = _isolated(
                    i.service_id, snapshots, failed, functools.partial(_sidecar, mine, i, endpoints, options)
                )
            else:
                snapshots[i.service_id] = snapshot
            if snapshot is not None:
                fresh[own] = snapshot
    if memo is not None:
        memo.clear()
        memo.update(kept)  # only what this round used: the cache stays as large as the fleet
    return snapshots


def _isolated(
    group: str, snapshots: dict[str, Snapshot], failed: dict[str, str] | None, build: Callable[[], Snapshot]
) -> Snapshot | None:
    """Build one group's snapshot into `snapshots`; with `failed`, an error is recorded there instead of raised."""
    try:
        snapshots[group] = build()
        return snapshots[group]
    except Exception as err:
        if failed is None:
            raise
        failed[group] = f"{type(err).__name__}: {err}"[:200]
        return None


def _shared_key(mine: tuple[PipelineVersion, ...], reach: Reach) -> Hashable:
    """What every sidecar of one model version depends on: the versions it serves, their clusters' endpoints."""
    clusters = sorted({c for p in mine for stage in p.pipeline.stages for c in stage.clusters()})
    versions = tuple((v.pipeline.name, v.version) for v in mine)  # a stored version never changes
    return (versions, tuple((c, reach.get(c, ())) for c in clusters))


def carried(
    deployments: Sequence[Deployment], instances: Sequence[RuntimeService], options: Options = Options()
) -> dict[str, Carried]:
    """Which pipeline versions each group's snapshot routes: the gateway its entries, a sidecar its hops."""
    entered = [*_entries(deployments, options), *(v for v, _ in _trials(deployments))]
    found = {options.gateway_group: frozenset((v.pipeline.name, v.version) for v in entered)}
    routed = [v for d in deployments for v in d.hops() if v.pipeline.transport in SERVED_TRANSPORTS]
    serving = {
        cluster: frozenset((v.pipeline.name, v.version) for v in vs) for cluster, vs in _served_by(routed).items()
    }
    for instance in instances:
        found[instance.service_id] = serving.get(instance.cluster, frozenset())
    return found


def _served_by(routed: Sequence[PipelineVersion]) -> dict[str, tuple[PipelineVersion, ...]]:
    """Model version (cluster) -> the routed versions with a stage it serves (a variant, member, join, shadow)."""
    found: dict[str, list[PipelineVersion]] = {}
    for v in routed:
        for cluster in {c for stage in v.pipeline.stages for c in stage.clusters()}:
            found.setdefault(cluster, []).append(v)
    return {cluster: tuple(vs) for cluster, vs in found.items()}


def _entries(deployments: Sequence[Deployment], options: Options) -> list[PipelineVersion]:
    """The versions the gateway routes: served ones, and Kafka ones when some bridge is there."""
    return [
        d.entry
        for d in deployments
        if d.entry is not None and (d.entry.pipeline.transport in SERVED_TRANSPORTS or options.bridges)
    ]


def _trials(deployments: Sequence[Deployment]) -> list[tuple[PipelineVersion, str]]:
    return [t for d in deployments for t in d.trials if t[0].pipeline.transport in SERVED_TRANSPORTS]


def _gateway(
    entries: Sequence[PipelineVersion],
    routed: Sequence[PipelineVersion],
    endpoints: Endpoints,
    options: Options,
    carriers: Sequence[Carrier] = (),
    trials: Sequence[tuple[PipelineVersion, str]] = (),
) -> Snapshot:
    """Routes into each entry version; clusters for every routed version's first stage.

    Envoy applies a route at once but warms a new cluster until its endpoints
    arrive, and meanwhile answers 503 (cluster not found) for it. So the gateway
    gets the first-stage clusters of a version while it is still pending, and the
    switch (switch.py) lets it in only once the gateway has acknowledged them.
    """
    signatures = dict(options.signatures)
    routes = [route for v, secret in trials for route in _trial_routes(v, secret)]  # before live ones: they match more
    routes += [route for v in entries for route in _gateway_routes(v, signatures=signatures)]
    routes += [*oip_server_routes(), *([_front_route()] if options.fronts else []), not_found_route()]
    listener = r.http_listener(
        "gateway",
        r.tcp_address(options.gateway_host, options.gateway_port),
        "gateway",
        optional=[RATE_LIMITING, BUFFERING],  # a request over its caller's quota is refused before it is read
    )
    # Not served: only their clusters. Kafka versions count too, so that switching
    # back to HTTP finds the first stage's clusters warm.
    ahead = [route for v in routed for route in _gateway_routes(v, as_http=True)]
    tls = options.gateway_tls_dir if options.mtls else ""
    own = [route for route in [*routes, *ahead] if route.route.cluster not in (BRIDGE, FRONT)]
    shared = shared_egress(carriers, own, endpoints, options.gateway_host if options.mtls else "")
    remote = remote_clusters(
        [*own, *(route for _, out in shared for route in out)], endpoints, tls, _near(options, options.gateway_host)
    )
    bridged = options.bridges and any(v.pipeline.transport == "kafka" for v in [*entries, *routed])
    local = [_bridge_cluster(options.bridges, tls)] if bridged else []
    local += [_front_cluster(options.fronts)] if options.fronts else []
    # after the clusters: an empty one stays warm
    configs = [r.route_config("gateway", only_serving(routes, endpoints.reach))]
    listeners = [listener]
    for me, out in shared:
        name = f"egress-{me.service_id}"  # the runtime's output, as its sidecar's egress would take it
        listeners.append(r.http_listener(name, r.pipe_address(shared_egress_socket(me.egress_uds)), name))
        configs.append(r.route_config(name, [*only_serving(out, endpoints.reach), not_carried_here()]))
    return _snapshot(listeners, configs, remote, local)


def _gateway_routes(
    v: PipelineVersion, as_http: bool = False, signatures: Mapping[str, str] | None = None
) -> list[rc.Route]:
    """A pipeline's JSON API and its Open Inference Protocol model, both into its first stage."""
    p = v.pipeline
    if p.transport == "kafka" and not as_http:
        json_api, infer = [_bridge_route(p, pipeline_path(p.name))], [_bridge_route(p, oip.infer_path(p.name))]
    else:
        first = stage_path(p.name, v.version, p.stages[0].name)
        json_api = stage_routes(p, v.version, 0, match_path=pipeline_path(p.name), rewrite=first)
        infer = stage_routes(p, v.version, 0, match_path=oip.infer_path(p.name), rewrite=first)
    logged = [r.header(h.LOG, f"{p.log_percent:g}")] if p.log_percent else []
    logged += flow_headers(p)
    for route in json_api:
        # only the gateway says a request is OIP, logged, of which priority and caller
        route.request_headers_to_remove.extend([*h.ENTRY, *h.FLOW, REPLAY])
        route.request_headers_to_add.extend(logged)
    for route in infer:
        route.request_headers_to_remove.extend([*h.ENTRY, *h.FLOW, REPLAY])
        route.request_headers_to_add.extend(
            [r.header(h.PROTOCOL, oip.PROTOCOL), r.header(h.OIP_MODEL, p.name), r.header(h.OIP_VERSION, str(v.version))]
        )
        route.request_headers_to_add.extend(logged)
    rate_limited(p, json_api + infer)
    ways_in = weighed(p, json_api + infer) + json_api + infer
    inputs = _signature_side(p.stages[0], "inputs", signatures or {})
    outputs = _signature_side(p.stages[-1], "outputs", signatures or {})
    return body_limited(p, ways_in) + oip_model_routes(p.name, str(v.version), inputs, outputs)


def weighed(p: Pipeline, routes: Sequence[rc.Route]) -> list[rc.Route]:
    """For each caller key the pipeline weighs (`fairness.shares`), its own copy of each way in, matched first:
    the key in the fairness header, exactly. It tells every stage the key's weight (`x-mll-share`, for
    admission's shares) and holds the key to its weight times the quota."""
    found = []
    for key, weight in p.fairness_shares:
        limit = p.rate_limit
        scaled = RateLimit(limit.per_second * weight, limit.burst * weight, limit.keys) if limit else None
        for route in routes:
            copy = rc.Route()
            copy.CopyFrom(route)
            exact = string_pb2.StringMatcher(exact=key)
            copy.match.headers.append(rc.HeaderMatcher(name=p.fairness_header, string_match=exact))
            copy.request_headers_to_add.append(r.header(h.SHARE, str(weight)))
            rate_limited(dataclasses.replace(p, rate_limit=scaled), [copy])
            found.append(copy)
    return found


def rate_limited(p: Pipeline, routes: Sequence[rc.Route]) -> None:
    """A pipeline's rate_limit on its ways in: a token bucket per caller key (the fairness header's value; the
    client's address for a request without it, or when the pipeline names none), refilled every second. Over it:
    429 at once with `retry-after: 1`, before the gateway reads the body or any stage sees the request. Envoy
    keeps at most `keys` buckets per route, forgetting the least recently used (a forgotten caller comes back
    with a full bucket)."""
    if p.rate_limit is None:
        return
    limit = p.rate_limit
    bucket = token_bucket_pb2.TokenBucket(
        max_tokens=limit.burst,
        tokens_per_fill=wrappers_pb2.UInt32Value(value=limit.per_second),
        fill_interval=r.millis(1000),
    )
    everyone = token_bucket_pb2.TokenBucket(
        max_tokens=2**31, tokens_per_fill=wrappers_pb2.UInt32Value(value=2**31), fill_interval=r.millis(1000)
    )  # what no descriptor matched: never limited (each caller has a descriptor)
    by_address = rc.RateLimit(actions=[rc.RateLimit.Action(remote_address=rc.RateLimit.Action.RemoteAddress())])
    descriptors = [_descriptor(bucket, ("remote_address", ""))]
    if p.fairness_header:
        header = p.fairness_header
        named = rc.RateLimit.Action.RequestHeaders(header_name=header, descriptor_key="caller", skip_if_absent=True)
        absent = rc.RateLimit.Action.HeaderValueMatch(
            descriptor_key="anonymous",
            descriptor_value="yes",
            expect_match=wrappers_pb2.BoolValue(value=False),
            headers=[rc.HeaderMatcher(name=header, present_match=True)],
        )
        by_header = rc.RateLimit(actions=[rc.RateLimit.Action(request_headers=named)])
        by_address = rc.RateLimit(actions=[rc.RateLimit.Action(header_value_match=absent), *by_address.actions])
        descriptors = [
            _descriptor(bucket, ("caller", "")),
            _descriptor(bucket, ("anonymous", "yes"), ("remote_address", "")),
        ]
    keyed = f"per {p.fairness_header or 'client address'}"
    config = rate_pb2.LocalRateLimit(
        stat_prefix=f"rate_limit.{p.name}",
        token_bucket=everyone,
        always_consume_default_token_bucket=wrappers_pb2.BoolValue(value=False),
        filter_enabled=ALWAYS,
        filter_enforced=ALWAYS,
        rate_limits=[*([by_header] if p.fairness_header else []), by_address],
        descriptors=descriptors,
        max_dynamic_descriptors=wrappers_pb2.UInt32Value(value=limit.keys),
        response_headers_to_add=[
            r.header("retry-after", "1"),
            r.header(h.RATE_LIMIT, f"{limit.per_second}/s, burst {limit.burst}, {keyed}"),
        ],
    )
    for route in routes:
        route.typed_per_filter_config[RATE_FILTER].CopyFrom(r.pack(config))


ALWAYS = base_pb2.RuntimeFractionalPercent(default_value=percent_pb2.FractionalPercent(numerator=100))


def _descriptor(
    bucket: token_bucket_pb2.TokenBucket, *entries: tuple[str, str]
) -> ratelimit_pb2.LocalRateLimitDescriptor:
    """A descriptor whose empty values match any value, each value its own bucket (Envoy's dynamic descriptors)."""
    found = ratelimit_pb2.LocalRateLimitDescriptor(token_bucket=bucket)
    for key, value in entries:
        found.entries.add(key=key, value=value)
    return found


def flow_headers(p: Pipeline) -> list[base_pb2.HeaderValueOption]:
    """What admission at each stage goes by (runtime_sdk/admission.py): the pipeline's priority, and the caller's
    key: the client's address, replaced by the named header's value when the request has it (Envoy adds no
    header whose value comes out empty)."""
    found = [r.header(h.CALLER, "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%")]
    if p.fairness_header:
        found.append(r.header(h.CALLER, f"%REQ({p.fairness_header})%"))
    return found + ([r.header(h.PRIORITY, str(p.priority))] if p.priority else [])


def _trial_routes(v: PipelineVersion, secret: str) -> list[rc.Route]:
    """A replay's way in: the pipeline's JSON and OIP paths into the candidate, for requests carrying `secret`.

    Never logged (a replay must not feed the log it reads), named `<pipeline>/replay/<stage>` so that
    Envoy's stats and errors tell replay requests from live ones.
    """
    # and sheddable: a replay never takes a place in predict from live traffic
    # and not held to the callers' rate limit: the replay sets its own rate
    quiet = dataclasses.replace(
        v, pipeline=dataclasses.replace(v.pipeline, log_percent=0, priority=-1000, rate_limit=None)
    )
    paths = {pipeline_path(v.pipeline.name), oip.infer_path(v.pipeline.name)}
    found = []
    for route in _gateway_routes(quiet, as_http=True):
        if route.match.path not in paths:
            continue  # the OIP metadata the gateway answers itself: the live version's
        route.match.headers.append(rc.HeaderMatcher(name=REPLAY, string_match=string_pb2.StringMatcher(exact=secret)))
        route.name = route.name.replace(f"{v.pipeline.name}/", f"{v.pipeline.name}/replay/", 1)
        found.append(route)
    return found


def _signature_side(stage: Stage, side: str, signatures: Mapping[str, str]) -> list[dict[str, Any]]:
    """The inputs or outputs of the first of the stage's variants whose signature is known ([]: none is)."""
    for variant in stage.all_variants():
        if variant.cluster in signatures:
            try:
                found = json.loads(signatures[variant.cluster]).get(side, [])
            except (ValueError, AttributeError):
                continue
            return [f for f in found if isinstance(f, dict)]
    return []


def gateway_clusters(version: PipelineVersion) -> frozenset[str]:
    """The clusters the gateway must have (warm) before it may enter `version`."""
    return frozenset(route_clusters(_gateway_routes(version)))


def _bridge_cluster(bridges: Sequence[tuple[str, int]], tls_dir: str) -> cluster_pb2.Cluster:
    cluster = r.static_cluster(BRIDGE, *(r.tcp_address(*b) for b in bridges))
    cluster.circuit_breakers.CopyFrom(r.RETRIES_UNCAPPED)  # a dying control plane: all its requests retry
    cluster.outlier_detection.CopyFrom(r.EJECT_ON_OWN_FAILURES)  # not picked again before Consul notices
    if tls_dir:
        cluster.transport_socket.CopyFrom(security.upstream_tls(tls_dir, BRIDGE_SERVICE))
    return cluster


def _front_cluster(fronts: Sequence[tuple[str, int]]) -> cluster_pb2.Cluster:
    """The OIP gRPC fronts, over HTTP/2 (they are gRPC servers); plaintext: they listen on loopback only."""
    cluster = r.static_cluster(FRONT, *(r.tcp_address(*f) for f in fronts))
    cluster.circuit_breakers.CopyFrom(r.RETRIES_UNCAPPED)
    cluster.outlier_detection.CopyFrom(r.EJECT_ON_OWN_FAILURES)
    cluster.typed_extension_protocol_options[r.UPSTREAM_HTTP_OPTIONS].CopyFrom(r.pack(r.HTTP2_UPSTREAM))
    return cluster


def _front_route() -> rc.Route:
    """The Open Inference Protocol over gRPC, on the gateway's own listener: to a front, which sends each call
    back here as OIP over HTTP (so a pipeline's splits, limits and transport apply as for HTTP callers)."""
    grpc_only = rc.RouteMatch(prefix=OIP_GRPC_PREFIX, grpc=rc.RouteMatch.GrpcRouteMatchOptions())
    action = rc.RouteAction(
        cluster=FRONT, timeout=r.millis(FRONT_TIMEOUT_MS), retry_policy=retry_policy(BRIDGE_RETRIES)
    )
    action.max_stream_duration.grpc_timeout_header_max.CopyFrom(r.millis(FRONT_TIMEOUT_MS))
    route = rc.Route(name="oip-grpc", match=grpc_only, route=action)
    route.request_headers_to_remove.extend([*h.ENTRY, REPLAY])
    return route


def _bridge_route(p: Pipeline, path: str) -> rc.Route:
    """A Kafka pipeline keeps its HTTP APIs: the gateway sends them to the bridge."""
    return rc.Route(
        name=f"{p.name}/kafka-bridge",
        match=rc.RouteMatch(path=path),
        route=rc.RouteAction(
            cluster=BRIDGE,
            prefix_rewrite=bridge_path(p.name),
            timeout=r.millis(p.timeout_ms() + 1000),
            # A control plane that dies takes its bridge along: try another one. A
            # request cut off mid-way may then run twice (Kafka mode is at least once).
            retry_policy=retry_policy(BRIDGE_RETRIES),
        ),
    )


def _sidecar(routed: Sequence[PipelineVersion], me: RuntimeService, endpoints: Endpoints, options: Options) -> Snapshot:
    if options.mtls and not me.tls_dir:
        raise ValueError("this deployment is mTLS and the runtime has no certificate folder (--security mtls)")
    tls = me.tls_dir if options.mtls else ""
    ready = readiness_route(LOCAL_HEALTH if me.health_port else LOCAL_HTTP, me.oip_model)
    # for control planes on other hosts: the Envoy's counters, the runtime's profiles and admission per caller
    remote = [*([stats_route()] if me.envoy_admin_port else []), profiles_route(), admission_route()] if tls else []
    ingress, egress = [ready, *remote], []
    for v in routed:
        more_in, more_out = hops(v, me, tls)
        ingress += more_in
        egress += more_out
    guard = [(security.RBAC_FILTER, security.rbac_filter())] if tls else []
    listeners = [
        r.http_listener(
            "ingress",
            r.tcp_address(me.host, me.ingress_port),
            "ingress",
            transport_socket=security.downstream_tls(tls) if tls else None,
            filters=guard,
        ),
        r.http_listener("egress", r.tcp_address("127.0.0.1", me.egress_port), "egress"),
    ]
    if me.egress_uds:
        listeners.append(r.http_listener("egress-uds", r.pipe_address(me.egress_uds), "egress"))
    clusters = [r.static_cluster(LOCAL_HTTP, r.tcp_address("127.0.0.1", me.runtime_port), idle_ms=r.LOCAL_IDLE_MS)]
    if me.health_port:
        clusters.append(r.static_cluster(LOCAL_HEALTH, r.tcp_address("127.0.0.1", me.health_port)))
    if me.runtime_uds:
        clusters.append(r.static_cluster(LOCAL_UDS, r.pipe_address(me.runtime_uds), idle_ms=r.LOCAL_IDLE_MS))
    if tls and me.envoy_admin_port:
        clusters.append(r.static_cluster(ENVOY_ADMIN, r.tcp_address("127.0.0.1", me.envoy_admin_port)))
    if options.kafka_broker and me.kafka_port:
        broker_filter = me.service_id in options.kafka_filter_nodes
        listeners.append(r.kafka_listener("kafka", r.tcp_address("127.0.0.1", me.kafka_port), KAFKA, broker_filter))
        clusters.append(r.static_cluster(KAFKA, r.tcp_address(*options.kafka_broker)))
    remote = remote_clusters(egress, endpoints, tls, _near(options, me.host))
    egress = only_serving(dedupe(egress), endpoints.reach)  # after the clusters: an empty one stays warm
    # Consul checks readiness on the loopback egress too: the ingress admits only pipeline callers under mTLS.
    routes = [r.route_config("ingress", ingress), r.route_config("egress", [ready, *egress])]
    return _snapshot(listeners, routes, remote, clusters)


def _near(options: Options, host: str) -> str:
    """The sender's host, whose runtimes it reaches at their socket; "": it reaches every one at its ingress."""
    return "" if options.colocated == "ingress" else host


def _snapshot(
    listeners: list[listener_pb2.Listener],
    routes: list[route_pb2.RouteConfiguration],
    remote: list[tuple[cluster_pb2.Cluster, endpoint_pb2.ClusterLoadAssignment]],
    local_clusters: Sequence[cluster_pb2.Cluster] = (),
) -> Snapshot:
    clusters = [*local_clusters, *(c for c, _ in remote)]
    assignments = [a for _, a in remote]
    digest = hashlib.sha256()
    for item in [*listeners, *routes, *clusters, *assignments]:
        digest.update(item.SerializeToString(deterministic=True))
    return Snapshot.build(
        digest.hexdigest()[:12],
        clusters=clusters,
        endpoints=assignments,
        listeners=listeners,
        routes=routes,
    )
