"""Small builders for the Envoy resources ML Lambda uses (real xds-protos types)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeAlias

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, protocol_pb2, substitution_format_string_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message
from xds.type.v3 import typed_struct_pb2

from contract import headers as h
from contract.naming import cluster_stat_name
from controlplane.xds.snapshot import pack

# xds-protos ships no type stubs: mypy reads these message classes as Any, so the names document, they do not check.
Address: TypeAlias = address_pb2.Address


def tcp_address(host: str, port: int) -> Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))


def pipe_address(path: str) -> Address:
    """A Unix domain socket (Envoy calls it a pipe)."""
    return address_pb2.Address(pipe=address_pb2.Pipe(path=path))


def millis(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


# Envoy lets a cluster run only 3 retries at once by default: when a host dies, every
# request in flight to it retries together and the 4th fails (the multi-host test saw it
# when a dead host came back from ejection before Consul had dropped it). The route bounds
# each request's retries (num_retries), so the cluster-wide cap is lifted, as Istio does.
RETRIES_UNCAPPED = circuit_breaker_pb2.CircuitBreakers(
    thresholds=[circuit_breaker_pb2.CircuitBreakers.Thresholds(max_retries=wrappers_pb2.UInt32Value(value=2**32 - 1))]
)


# Eject a host for its own failures (connect, reset, timeout) only: a 5xx may be relayed
# from a stage further down, or caused by the input, and says nothing about this host.
_OFF = wrappers_pb2.UInt32Value(value=0)
EJECT_ON_OWN_FAILURES = outlier_detection_pb2.OutlierDetection(
    split_external_local_origin_errors=True,
    consecutive_local_origin_failure=wrappers_pb2.UInt32Value(value=5),
    enforcing_consecutive_local_origin_failure=wrappers_pb2.UInt32Value(value=100),
    enforcing_consecutive_5xx=_OFF,
    enforcing_consecutive_gateway_failure=_OFF,
    enforcing_success_rate=_OFF,
    interval=millis(2000),
    base_ejection_time=millis(10000),
    max_ejection_percent=wrappers_pb2.UInt32Value(value=50),
)


def eds_cluster(name: str, connect_timeout_ms: int = 1000, outlier: bool = True) -> cluster_pb2.Cluster:
    """A cluster whose endpoints come over EDS (from Consul via the control plane)."""
    cluster = cluster_pb2.Cluster(
        name=name,
        alt_stat_name=cluster_stat_name(name),
        type=cluster_pb2.Cluster.EDS,
        connect_timeout=millis(connect_timeout_ms),
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        circuit_breakers=RETRIES_UNCAPPED,
    )
    if outlier:
        cluster.outlier_detection.CopyFrom(EJECT_ON_OWN_FAILURES)
    return cluster


AT_SOCKET = "mll-at-socket"  # endpoint metadata: a runtime's own Unix socket on the sender's host
_MATCH = "envoy.transport_socket_match"
# In an mTLS cluster, the endpoints at a runtime's socket speak plaintext (a 0700 folder on the same host).
PLAIN_AT_SOCKET = cluster_pb2.Cluster.TransportSocketMatch(
    name="at-socket",
    match=struct_pb2.Struct(fields={AT_SOCKET: struct_pb2.Value(bool_value=True)}),
    transport_socket=base_pb2.TransportSocket(
        name="envoy.transport_sockets.raw_buffer", typed_config=pack(raw_buffer_pb2.RawBuffer())
    ),
)


def load_assignment(
    cluster_name: str, addresses: Iterable[Address], at_socket: Iterable[Address] = ()
) -> endpoint_pb2.ClusterLoadAssignment:
    """Endpoints of a cluster; those `at_socket` are marked so that PLAIN_AT_SOCKET applies to them."""
    marked = base_pb2.Metadata()
    marked.filter_metadata[_MATCH].update({AT_SOCKET: True})
    lb = [endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(address=a)) for a in addresses]
    lb += [
        endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(address=a), metadata=marked)
        for a in at_socket
    ]
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster_name, endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=lb)]
    )


def http_listener(
    name: str,
    address: Address,
    route_config_name: str,
    transport_socket: base_pb2.TransportSocket | None = None,
    filters: Sequence[tuple[str, Message]] = (),
    optional: Sequence[tuple[str, Message]] = (),
) -> listener_pb2.Listener:
    """An HTTP listener whose routes come over RDS; `filters` go before the router, then `optional` ones,
    which are off unless a route's per-filter config turns them on."""
    chain = [hcm_pb2.HttpFilter(name=n, typed_config=pack(config)) for n, config in filters]
    chain += [hcm_pb2.HttpFilter(name=n, typed_config=pack(config), disabled=True) for n, config in optional]
    chain.append(hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())))
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        rds=hcm_pb2.Rds(route_config_name=route_config_name, config_source=_ads()),
        http_filters=chain,
        generate_request_id=wrappers_pb2.BoolValue(value=True),
        local_reply_config=hcm_pb2.LocalReplyConfig(mappers=_local_replies()),
    )
    listener = _listener(name, address, ("envoy.filters.network.http_connection_manager", hcm))
    if transport_socket is not None:
        listener.filter_chains[0].transport_socket.CopyFrom(transport_socket)
    return listener


def _local_replies() -> list[hcm_pb2.ResponseMapper]:
    """Envoy's own errors (503 no healthy upstream, 504 timeout) as JSON naming the route.

    Routes are named after the pipeline stage they lead to, so a client sees
    which stage failed. Only replies with a response flag are Envoy's errors;
    direct responses (OIP metadata, a 422 for an unknown branch) keep their own
    body. This Envoy's own 503s (its upstream unreachable or overflowing) are
    marked: the hop before may retry them. The first mapper that matches applies.
    """
    body = struct_pb2.Struct()
    body.update({"error": "%LOCAL_REPLY_BODY%", "code": "%RESPONSE_CODE%", "route": "%ROUTE_NAME%"})
    as_json = substitution_format_string_pb2.SubstitutionFormatString(json_format=body)
    envoys_own = accesslog_pb2.AccessLogFilter(response_flag_filter=accesslog_pb2.ResponseFlagFilter())
    only_503 = accesslog_pb2.ComparisonFilter(
        op=accesslog_pb2.ComparisonFilter.EQ,
        value=base_pb2.RuntimeUInt32(default_value=503, runtime_key="mllambda.retriable_status"),
    )
    both = accesslog_pb2.AndFilter(
        filters=[
            envoys_own,
            accesslog_pb2.AccessLogFilter(status_code_filter=accesslog_pb2.StatusCodeFilter(comparison=only_503)),
        ]
    )
    only_429 = accesslog_pb2.ComparisonFilter(
        op=accesslog_pb2.ComparisonFilter.EQ,
        value=base_pb2.RuntimeUInt32(default_value=429, runtime_key="mllambda.rate_limited_status"),
    )
    limited = struct_pb2.Struct()
    over = "this caller is over the pipeline's rate limit (x-mll-rate-limit); retry after a second"
    limited.update({"error": over, "refused": "rate limited", "code": "%RESPONSE_CODE%", "route": "%ROUTE_NAME%"})
    return [
        hcm_pb2.ResponseMapper(  # Envoy's own 429s: its local rate limit (a pipeline's rate_limit), which sets
            # its response flag only after the reply is made; a runtime's 429 is not a local reply and keeps its body
            filter=accesslog_pb2.AccessLogFilter(
                status_code_filter=accesslog_pb2.StatusCodeFilter(comparison=only_429)
            ),
            body_format_override=substitution_format_string_pb2.SubstitutionFormatString(json_format=limited),
        ),
        hcm_pb2.ResponseMapper(
            filter=accesslog_pb2.AccessLogFilter(and_filter=both),
            headers_to_add=[header(h.RETRIABLE, "true")],
            body_format_override=as_json,
        ),
        hcm_pb2.ResponseMapper(filter=envoys_own, body_format_override=as_json),
    ]


def static_cluster(
    name: str, *addresses: Address, connect_timeout_ms: int = 1000, idle_ms: int = 0
) -> cluster_pb2.Cluster:
    """A cluster with fixed endpoints (a sidecar's own runtime, the control planes' Kafka bridges); `idle_ms`:
    close a connection idle that long (Envoy's default is an hour)."""
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=millis(connect_timeout_ms),
        load_assignment=load_assignment(name, addresses),
    )
    if idle_ms:
        options = http_protocol_options_pb2.HttpProtocolOptions(
            common_http_protocol_options=protocol_pb2.HttpProtocolOptions(idle_timeout=millis(idle_ms)),
            explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                http_protocol_options=protocol_pb2.Http1ProtocolOptions()
            ),
        )
        cluster.typed_extension_protocol_options[UPSTREAM_HTTP_OPTIONS].CopyFrom(pack(options))
    return cluster


UPSTREAM_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP2_UPSTREAM = http_protocol_options_pb2.HttpProtocolOptions(  # to a gRPC server
    explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
        http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
    )
)
# A sidecar closes its idle connections to its runtime before the runtime would (runtime_sdk/wire.py, IDLE_SECONDS
# is 300): the one that closes first must be the one that picks connections, or a request meets a closing one.
LOCAL_IDLE_MS = 60_000


def header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


KAFKA_BROKER_FILTER = "envoy.filters.network.kafka_broker"


def kafka_listener(name: str, address: Address, cluster: str, broker_filter: bool) -> listener_pb2.Listener:
    """A runtime's way to the broker through its sidecar.

    With a contrib Envoy build the kafka_broker filter goes first (Kafka-level
    stats). Neither xds-protos nor the standard build carry its proto, so it is
    sent as a TypedStruct naming the inner type.
    """
    filters = []
    if broker_filter:
        inner = struct_pb2.Struct()
        inner.update({"stat_prefix": name})
        typed = typed_struct_pb2.TypedStruct(
            type_url="type.googleapis.com/envoy.extensions.filters.network.kafka_broker.v3.KafkaBroker", value=inner
        )
        filters.append((KAFKA_BROKER_FILTER, typed))
    filters.append(("envoy.filters.network.tcp_proxy", tcp_proxy_pb2.TcpProxy(stat_prefix=name, cluster=cluster)))
    return _listener(name, address, *filters)


def _listener(name: str, address: Address, *filters: tuple[str, Message]) -> listener_pb2.Listener:
    """A listener with one filter chain: (filter name, its config) in order."""
    chain = [listener_components_pb2.Filter(name=n, typed_config=pack(config)) for n, config in filters]
    return listener_pb2.Listener(
        name=name, address=address, filter_chains=[listener_components_pb2.FilterChain(filters=chain)]
    )


def route_config(
    name: str, routes: Sequence[route_components_pb2.Route], domains: Sequence[str] = ("*",)
) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[route_components_pb2.VirtualHost(name=name, domains=list(domains), routes=list(routes))],
    )


def set_clusters(
    action: route_components_pb2.RouteAction, weights: Sequence[tuple[str, int]]
) -> route_components_pb2.RouteAction:
    """Point a route at one cluster, or split it by integer weights across several."""
    if len(weights) == 1:
        action.cluster = weights[0][0]
    else:
        action.weighted_clusters.CopyFrom(
            route_components_pb2.WeightedCluster(
                clusters=[
                    route_components_pb2.WeightedCluster.ClusterWeight(
                        name=cluster, weight=wrappers_pb2.UInt32Value(value=weight)
                    )
                    for cluster, weight in weights
                ]
            )
        )
    return action


def weighted_route(
    prefix: str, weights: Sequence[tuple[str, int]], timeout_ms: int = 15000
) -> route_components_pb2.Route:
    """A prefix route split by weights (tests and benchmarks build bare snapshots with it)."""
    action = set_clusters(route_components_pb2.RouteAction(timeout=millis(timeout_ms)), weights)
    return route_components_pb2.Route(match=route_components_pb2.RouteMatch(prefix=prefix), route=action)
