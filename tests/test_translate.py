"""Pipelines + runtimes -> Envoy resources, on plain data: no sockets."""

from __future__ import annotations

import dataclasses
from typing import Any

from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from xds.type.v3 import typed_struct_pb2

from contract.service import RuntimeService
from controlplane.pipeline.spec import parse_pipeline
from controlplane.translate.pipelines import Deployment, Memo, Options, carried, gateway_clusters, translate
from controlplane.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot
from tests.helpers.translation import PIPELINE, RUNTIMES, at, entries, instance, routes, steady


def test_gateway_enters_stage_zero_with_the_whole_chain_timeout() -> None:
    gateway = translate(steady(PIPELINE), RUNTIMES)["gateway"]
    entry = entries(gateway)[0]
    assert entry.match.path == "/pipelines/p"
    assert entry.route.prefix_rewrite == "/pipelines/p/v1/a"
    assert entry.route.cluster == "ma.v1"
    assert entry.route.timeout.seconds == 6  # 1 + 2 + 3 s: the calls are nested
    assert routes(gateway, "gateway")[-1].direct_response.status == 404


def test_egress_of_stage_a_splits_mirrors_and_retries_into_stage_b() -> None:
    passing = [dataclasses.replace(i, passing=True) for i in RUNTIMES]
    sidecar = translate(steady(PIPELINE), passing)["ma-v1-1"]
    (into_b,) = [r for r in routes(sidecar, "egress") if r.match.path == "/pipelines/p/v1/b"]
    weights = {c.name: c.weight.value for c in into_b.route.weighted_clusters.clusters}
    assert weights == {"mb.v1": 90, "mb.v2": 10}
    (mirror,) = into_b.route.request_mirror_policies
    assert (mirror.cluster, mirror.runtime_fraction.default_value.numerator) == ("mb.v3", 50_000)
    # Retried: failures of the hop itself, and 503s its sidecar made (runtime unreachable) -- never a
    # 503 relayed from further down, which every hop before would otherwise multiply.
    assert into_b.route.retry_policy.retry_on == "connect-failure,refused-stream,reset,retriable-headers"
    assert [m.name for m in into_b.route.retry_policy.retriable_headers] == ["x-mll-retriable"]
    assert not into_b.route.retry_policy.retriable_status_codes
    # Bounded per request by num_retries; not cluster-wide (Envoy's default of 3 at once fails the 4th).
    assert sidecar.of_type(CLUSTER).by_name["mb.v1"].circuit_breakers.thresholds[0].max_retries.value > 1000


def test_a_split_leaves_out_a_variant_with_no_passing_instance_but_keeps_its_cluster_warm() -> None:
    sidecar = translate(steady(PIPELINE), RUNTIMES)["ma-v1-1"]  # mb.v2's only instance is not passing
    (into_b,) = [r for r in routes(sidecar, "egress") if r.match.path == "/pipelines/p/v1/b"]
    assert into_b.route.cluster == "mb.v1" and not into_b.route.weighted_clusters.clusters
    assert "mb.v2" in sidecar.of_type(CLUSTER).by_name
    nobody = [i for i in RUNTIMES if i.model != "mb"]  # no variant serving: the split is kept (503s say so)
    (into_b,) = [
        r
        for r in routes(translate(steady(PIPELINE), nobody)["ma-v1-1"], "egress")
        if r.match.path == "/pipelines/p/v1/b"
    ]
    assert len(into_b.route.weighted_clusters.clusters) == 2


def test_endpoints_are_passing_sidecar_ingresses_only() -> None:
    sidecar = translate(steady(PIPELINE), RUNTIMES, Options(colocated="ingress"))["ma-v1-1"]
    assignments = sidecar.of_type(ENDPOINT).by_name
    port = [e.endpoint.address.socket_address.port_value for e in assignments["mb.v1"].endpoints[0].lb_endpoints]
    assert port == [8002]
    assert list(assignments["mb.v2"].endpoints[0].lb_endpoints) == []  # not passing: no traffic


def test_ingress_tells_the_runtime_its_next_hop_and_branch_field() -> None:
    sidecar = translate(steady(PIPELINE), RUNTIMES)["mb-v1-2"]
    (ingress,) = [r for r in routes(sidecar, "ingress") if r.match.path == "/pipelines/p/v1/b"]
    added = {h.header.key: h.header.value for h in ingress.request_headers_to_add}
    assert added["x-mll-next"] == "/pipelines/p/v1/c"
    assert added["x-mll-branch-field"] == "category"
    assert ingress.route.cluster == "local-http"
    (branch, fallback) = [r for r in routes(sidecar, "egress") if r.match.path == "/pipelines/p/v1/c"]
    assert (branch.match.headers[0].name, branch.match.headers[0].string_match.exact) == ("x-mll-branch", "x")
    assert fallback.direct_response.status == 422


def test_uds_transport_points_ingress_at_the_unix_socket() -> None:
    uds = parse_pipeline(
        {**{"name": "p", "transport": "uds"}, "stages": [{"name": "a", "variants": [{"model": "ma", "version": "v1"}]}]}
    )
    sidecar = translate(steady(uds), RUNTIMES)["ma-v1-1"]
    (ingress,) = [r for r in routes(sidecar, "ingress") if r.match.path == "/pipelines/p/v1/a"]
    assert ingress.route.cluster == "local-uds"
    local = sidecar.of_type(CLUSTER).by_name["local-uds"]
    assert local.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.pipe.path == "/run/ma-1.sock"


def test_unchanged_inputs_give_the_same_snapshot_versions() -> None:
    first, second = translate(steady(PIPELINE), RUNTIMES), translate(steady(PIPELINE), list(reversed(RUNTIMES)))
    assert {g: s.version for g, s in first.items()} == {g: s.version for g, s in second.items()}


def test_sidecars_proxy_kafka_and_use_the_broker_filter_only_where_envoy_has_it() -> None:
    runtimes = [instance("ma", "v1", 1, kafka_port=9500), instance("mb", "v1", 2, kafka_port=9501)]
    options = Options(kafka_broker=("127.0.0.1", 9092), kafka_filter_nodes=frozenset({"mb-v1-2"}))
    snapshots = translate(steady(PIPELINE), runtimes, options)
    plain = snapshots["ma-v1-1"].of_type(LISTENER).by_name["kafka"].filter_chains[0].filters
    assert [f.name for f in plain] == ["envoy.filters.network.tcp_proxy"]
    contrib = snapshots["mb-v1-2"].of_type(LISTENER).by_name["kafka"].filter_chains[0].filters
    assert [f.name for f in contrib] == ["envoy.filters.network.kafka_broker", "envoy.filters.network.tcp_proxy"]
    typed = typed_struct_pb2.TypedStruct()
    contrib[0].typed_config.Unpack(typed)
    assert typed.type_url.endswith("kafka_broker.v3.KafkaBroker")
    broker = snapshots["ma-v1-1"].of_type(CLUSTER).by_name["kafka-broker"]
    assert broker.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value == 9092


def test_kafka_pipelines_reach_every_bridge_and_retry_another_one() -> None:
    kafka = dataclasses.replace(PIPELINE, transport="kafka")
    assert (
        translate(steady(kafka), RUNTIMES)["gateway"].of_type(CLUSTER).by_name.keys().isdisjoint({"mll-kafka-bridge"})
    )
    options = Options(bridges=(("10.0.0.1", 18002), ("10.0.0.2", 18002)))
    gateway = translate(steady(kafka), RUNTIMES, options)["gateway"]
    entry = entries(gateway)[0]
    assert (entry.match.path, entry.route.prefix_rewrite) == ("/pipelines/p", "/bridge/p")
    assert entry.route.cluster == "mll-kafka-bridge"
    assert {"connect-failure", "reset"} <= set(entry.route.retry_policy.retry_on.split(","))
    assert entry.route.retry_policy.num_retries.value >= 1
    assert entry.route.retry_policy.retry_host_predicate[0].name == "envoy.retry_host_predicates.previous_hosts"
    bridge = gateway.of_type(CLUSTER).by_name["mll-kafka-bridge"]
    hosts = [e.endpoint.address.socket_address.address for e in bridge.load_assignment.endpoints[0].lb_endpoints]
    assert hosts == ["10.0.0.1", "10.0.0.2"]
    assert bridge.circuit_breakers.thresholds[0].max_retries.value > 1000  # every in-flight request may retry
    # A bridge that fails to connect is set aside at once, before Consul's check notices its control plane died.
    assert bridge.outlier_detection.split_external_local_origin_errors
    assert bridge.outlier_detection.enforcing_consecutive_5xx.value == 0  # a pipeline's 504 is not the bridge's fault


def test_listeners_use_rds_routes_that_exist() -> None:
    sidecar = translate(steady(PIPELINE), RUNTIMES)["ma-v1-1"]
    hcm = hcm_pb2.HttpConnectionManager()
    sidecar.of_type(LISTENER).by_name["egress"].filter_chains[0].filters[0].typed_config.Unpack(hcm)
    assert hcm.rds.route_config_name in sidecar.of_type(ROUTE).by_name


def test_a_pending_version_gets_its_hops_beside_the_entry_which_the_gateway_keeps_entering() -> None:
    v1, v2 = at(PIPELINE, 1), at(dataclasses.replace(PIPELINE, stages=PIPELINE.stages[:2]), 2)
    deployment = [Deployment(v1, (v1, v2))]
    snapshots = translate(deployment, RUNTIMES)
    entry = entries(snapshots["gateway"])[0]
    assert entry.route.prefix_rewrite == "/pipelines/p/v1/a"
    sidecar = snapshots["mb-v1-2"]
    paths = {r.match.path for r in routes(sidecar, "ingress")}
    assert {"/pipelines/p/v1/b", "/pipelines/p/v2/b"} <= paths
    nexts = {
        r.match.path: {h.header.key: h.header.value for h in r.request_headers_to_add}
        for r in routes(sidecar, "ingress")
    }
    assert nexts["/pipelines/p/v1/b"]["x-mll-next"] == "/pipelines/p/v1/c"
    assert "x-mll-next" not in nexts["/pipelines/p/v2/b"]  # b is v2's last stage
    pairs = carried(deployment, [*RUNTIMES, instance("mx", "v1", 4)])
    assert pairs["gateway"] == {("p", 1)}
    assert pairs["mb-v1-2"] == {("p", 1), ("p", 2)}
    assert pairs["mx-v1-4"] == {("p", 1)}  # stage c is gone in v2


def test_a_deleted_pipeline_loses_its_entry_while_its_hops_drain() -> None:
    v1 = at(PIPELINE)
    snapshots = translate([Deployment(None, (v1,))], RUNTIMES)
    assert [r.name for r in routes(snapshots["gateway"], "gateway")] == [
        "oip-server",
        "oip-health",
        "oip-health",
        "not-found",
    ]
    assert "/pipelines/p/v1/b" in {r.match.path for r in routes(snapshots["mb-v1-2"], "ingress")}
    assert carried([Deployment(None, (v1,))], RUNTIMES)["gateway"] == frozenset()


def test_the_gateway_warms_a_pending_versions_first_clusters_before_it_routes_there() -> None:
    v1 = at(PIPELINE, 1)
    starts_at_b = dataclasses.replace(PIPELINE, stages=PIPELINE.stages[1:2])
    v2 = at(starts_at_b, 2)
    gateway = translate([Deployment(v1, (v1, v2))], RUNTIMES)["gateway"]
    entry = entries(gateway)[0]
    assert entry.route.cluster == "ma.v1"  # still entering v1
    assert {"ma.v1", "mb.v1", "mb.v2", "mb.v3"} <= set(gateway.of_type(CLUSTER).by_name)  # v2's, warm ahead
    assert gateway_clusters(v2) == {"mb.v1", "mb.v2", "mb.v3"}  # its split and its shadow


def test_a_group_whose_translation_fails_keeps_its_last_snapshot_and_stops_no_other(monkeypatch: Any) -> None:
    from controlplane.delivery.reconcile import Reconciler
    from controlplane.translate import pipelines
    from controlplane.xds.acks import AckBook
    from controlplane.xds.cache import SnapshotCache

    cache = SnapshotCache()
    reconciler = Reconciler(cache, AckBook(), Options())
    reconciler.reconcile(steady(PIPELINE), RUNTIMES, ())
    before = {group: cache.get(group) for group in cache.groups()}
    sidecar = pipelines._sidecar

    def broken_for_mb(routed: Any, me: RuntimeService, *rest: Any) -> Snapshot:
        if me.service_id == "mb-v1-2":
            raise RuntimeError("a translation bug")
        return sidecar(routed, me, *rest)

    monkeypatch.setattr(pipelines, "_sidecar", broken_for_mb)
    v2 = dataclasses.replace(PIPELINE.stages[0], timeout_ms=1500)
    changed = dataclasses.replace(PIPELINE, stages=(v2, *PIPELINE.stages[1:]))
    reconciler.reconcile([Deployment.steady(at(changed, 2))], RUNTIMES, ())

    assert reconciler.failed == {"mb-v1-2": "RuntimeError: a translation bug"}
    assert cache.get("mb-v1-2") is before["mb-v1-2"]  # kept, not emptied
    assert cache.get("gateway") is not before["gateway"] and cache.get("ma-v1-1") is not before["ma-v1-1"]
    assert any("translation failed" in m for m in reconciler.missing_acks(("p", 2)))

    monkeypatch.setattr(pipelines, "_sidecar", sidecar)  # fixed: the group catches up, the report goes
    reconciler.reconcile([Deployment.steady(at(changed, 2))], RUNTIMES, ())
    assert reconciler.failed == {} and cache.get("mb-v1-2") is not before["mb-v1-2"]


def test_with_a_memo_only_sidecars_whose_inputs_changed_get_new_snapshots() -> None:
    memo: Memo = {}
    idle = [instance(f"idle{n}", "v1", 10 + n) for n in range(5)]  # in the fleet, in no pipeline
    first = translate(steady(PIPELINE), [*RUNTIMES, *idle], memo=memo)
    fresh = translate(steady(PIPELINE), [*RUNTIMES, *idle])
    assert {g: s.version for g, s in first.items()} == {g: s.version for g, s in fresh.items()}  # same result

    more = [*RUNTIMES, *idle, instance("mb", "v1", 40)]  # stage b gains a replica
    second = translate(steady(PIPELINE), more, memo=memo)
    assert second["ma-v1-1"] is not first["ma-v1-1"]  # stage a sends to b: its endpoints changed
    assert all(second[i.service_id] is first[i.service_id] for i in idle)  # untouched, not rebuilt
    assert {g: s.version for g, s in second.items()} == {
        g: s.version for g, s in translate(steady(PIPELINE), more).items()
    }
    assert sum(len(per) for per in memo.values()) == len(more)  # bounded by the fleet


def test_under_mtls_every_hop_verifies_its_peer_and_each_stage_admits_only_its_callers() -> None:
    from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

    secured = [dataclasses.replace(i, tls_dir=f"/certs/{i.service_id}") for i in RUNTIMES]
    options = Options(mtls=True, gateway_tls_dir="/certs/gateway")
    snapshots = translate(steady(PIPELINE), secured, options)

    def expected_peer(cluster: Any) -> list[str]:
        context = tls_pb2.UpstreamTlsContext()
        cluster.transport_socket.typed_config.Unpack(context)
        sds = context.common_tls_context.tls_certificate_sds_secret_configs[0].sds_config.path_config_source.path
        matchers = context.common_tls_context.combined_validation_context.default_validation_context
        return [sds, *(m.matcher.safe_regex.regex for m in matchers.match_typed_subject_alt_names)]

    gateway_cluster = snapshots["gateway"].of_type(CLUSTER).by_name["ma.v1"]
    assert expected_peer(gateway_cluster) == ["/certs/gateway/cert.json", r"spiffe://[^/]+/ns/default/dc/[^/]+/svc/ma"]
    sidecar = snapshots["ma-v1-1"]
    assert expected_peer(sidecar.of_type(CLUSTER).by_name["mb.v2"])[1].endswith("/svc/mb")

    def admitted(snapshot: Snapshot, route_name: str) -> set[str]:
        route = next(r for r in routes(snapshot, "ingress") if r.name == route_name)
        per_route = rbac_pb2.RBACPerRoute()
        route.typed_per_filter_config["envoy.filters.http.rbac"].Unpack(per_route)
        policy = per_route.rbac.rules.policies["pipeline-graph"]
        return {p.authenticated.principal_name.safe_regex.regex.rsplit("/", 1)[1] for p in policy.principals}

    assert admitted(sidecar, "p/a") == {"mllambda\\-gateway"}  # stage 0: the gateway only
    assert admitted(snapshots["mb-v1-2"], "p/b") == {"ma"}  # stage 1: stage 0's model only
    ingress = sidecar.of_type(LISTENER).by_name["ingress"]
    assert ingress.filter_chains[0].transport_socket.name == "envoy.transport_sockets.tls"
    manager = hcm_pb2.HttpConnectionManager()
    ingress.filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert [f.name for f in manager.http_filters] == ["envoy.filters.http.rbac", "envoy.filters.http.router"]
    # Consul's check reaches readiness through the loopback egress.
    assert "readyz" in {r.name for r in routes(sidecar, "egress")}


def test_under_mtls_a_runtime_without_certificates_gets_no_config_and_the_others_are_unaffected() -> None:
    secured = [dataclasses.replace(i, tls_dir=f"/certs/{i.service_id}") for i in RUNTIMES[:1]] + RUNTIMES[1:]
    failed: dict[str, str] = {}
    snapshots = translate(steady(PIPELINE), secured, Options(mtls=True, gateway_tls_dir="/g"), failed=failed)
    assert "ma-v1-1" in snapshots and "mb-v1-2" not in snapshots
    assert "certificate folder" in failed["mb-v1-2"]


def test_a_scaled_to_zero_version_is_reached_at_its_activator_in_plaintext_until_a_replica_passes() -> None:
    secured = [dataclasses.replace(i, tls_dir=f"/certs/{i.service_id}") for i in RUNTIMES[:1]]  # only ma:v1 runs
    parked = (("ma.v1", "127.0.0.1", 4444), ("mb.v1", "127.0.0.1", 5555))
    options = Options(mtls=True, gateway_tls_dir="/certs/gateway", parked=parked)
    snapshots = translate(steady(PIPELINE), secured, options)

    def endpoints(snapshot: Snapshot, cluster: str) -> list[int]:
        assignment = snapshot.of_type(ENDPOINT).by_name[cluster]
        return [e.endpoint.address.socket_address.port_value for e in assignment.endpoints[0].lb_endpoints]

    sidecar = snapshots["ma-v1-1"]
    assert endpoints(sidecar, "mb.v1") == [5555]  # no replica: the activator holds its requests
    assert not sidecar.of_type(CLUSTER).by_name["mb.v1"].HasField("transport_socket")  # on loopback, plaintext
    assert sidecar.of_type(CLUSTER).by_name["mb.v2"].HasField("transport_socket")  # the others keep mTLS
    # A version with a passing replica is reached there, whatever `parked` says (a stale reading): here at
    # its socket (the gateway's host), elsewhere at its ingress.
    (replica,) = snapshots["gateway"].of_type(ENDPOINT).by_name["ma.v1"].endpoints[0].lb_endpoints
    assert replica.endpoint.address.pipe.path == "/run/ma-1.sock"
    far = translate(steady(PIPELINE), secured, dataclasses.replace(options, gateway_host="10.0.0.9"))
    assert endpoints(far["gateway"], "ma.v1") == [8001]
    assert snapshots["gateway"].of_type(CLUSTER).by_name["ma.v1"].HasField("transport_socket")


def test_the_gateways_oip_metadata_names_the_first_stages_inputs_and_the_last_stages_outputs() -> None:
    """Signatures of saved models (read from the store by the control plane) become the pipeline's metadata."""
    import json

    first = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}], "outputs": []})
    last = json.dumps({"inputs": [], "outputs": [{"name": "label", "datatype": "ANY", "shape": [-1]}]})
    options = Options(signatures=(("ma.v1", first), ("mx.v1", last)))  # the last stage: a branch
    gateway = translate(steady(PIPELINE), RUNTIMES, options)["gateway"]
    (about,) = [x for x in routes(gateway, "gateway") if x.match.path == "/v2/models/p"]
    metadata = json.loads(about.direct_response.body.inline_string)
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert metadata["outputs"] == [{"name": "label", "datatype": "BYTES", "shape": [-1]}]  # any JSON: BYTES
    plain = translate(steady(PIPELINE), RUNTIMES)["gateway"]
    (unknown,) = [x for x in routes(plain, "gateway") if x.match.path == "/v2/models/p"]
    assert json.loads(unknown.direct_response.body.inline_string)["inputs"] == []


def test_grpc_calls_reach_every_oip_front_over_http2_and_only_when_one_is_there() -> None:
    alone = translate(steady(PIPELINE), RUNTIMES)["gateway"]
    assert "mll-oip-grpc" not in alone.of_type(CLUSTER).by_name
    assert not [r for r in routes(alone, "gateway") if r.name == "oip-grpc"]
    gateway = translate(steady(PIPELINE), RUNTIMES, Options(fronts=(("127.0.0.1", 5001), ("127.0.0.1", 5002))))
    front = gateway["gateway"].of_type(CLUSTER).by_name["mll-oip-grpc"]
    hosts = [e.endpoint.address.socket_address.port_value for e in front.load_assignment.endpoints[0].lb_endpoints]
    assert hosts == [5001, 5002]
    options = front.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    explicit = http_protocol_options_pb2.HttpProtocolOptions.FromString(options.value).explicit_http_config
    assert explicit.HasField("http2_protocol_options")  # the fronts are gRPC servers
    route = next(r for r in routes(gateway["gateway"], "gateway") if r.name == "oip-grpc")
    assert route.match.prefix == "/inference.GRPCInferenceService/" and route.match.HasField("grpc")
    assert [r.name for r in routes(gateway["gateway"], "gateway")][
        -1
    ] == "not-found"  # after every pipeline's own routes
    assert all(
        s.of_type(CLUSTER).by_name.keys().isdisjoint({"mll-oip-grpc"}) for n, s in gateway.items() if n != "gateway"
    )


def test_a_weighed_caller_key_gets_its_own_ways_in_first_with_its_weight_and_its_weight_times_the_quota() -> None:
    from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2

    from controlplane.pipeline.model import RateLimit
    from controlplane.translate.pipelines import RATE_FILTER

    weighed = dataclasses.replace(
        PIPELINE,
        fairness_header="x-tenant",
        fairness_shares=(("gold", 3),),
        rate_limit=RateLimit(per_second=2, burst=4),
    )
    found = entries(translate(steady(weighed), RUNTIMES)["gateway"])
    ways_in = [r for r in found if r.match.path in ("/pipelines/p", "/v2/models/p/infer")]
    assert len(ways_in) == 4, [r.match.path for r in found]
    gold, plain = ways_in[:2], ways_in[2:]  # Envoy takes the first match: gold's own come first
    for route in gold:
        assert [(m.name, m.string_match.exact) for m in route.match.headers] == [("x-tenant", "gold")]
        added = {a.header.key: a.header.value for a in route.request_headers_to_add}
        assert added["x-mll-share"] == "3" and added["x-mll-caller"] == "%REQ(x-tenant)%"
    for route in plain:
        assert not route.match.headers and "x-mll-share" not in [a.header.key for a in route.request_headers_to_add]
        assert "x-mll-share" in route.request_headers_to_remove  # a client cannot weigh itself
    quotas = []
    for route in (gold[0], plain[0]):
        config = local_rate_limit_pb2.LocalRateLimit()
        route.typed_per_filter_config[RATE_FILTER].Unpack(config)
        bucket = config.descriptors[0].token_bucket
        quotas.append((bucket.tokens_per_fill.value, bucket.max_tokens))
    assert quotas == [(6, 12), (2, 4)]
