"""An immutable, versioned set of Envoy resources for one node group.

A snapshot is checked for consistency when it is built, so the server never
has to hold back a response because something it references is missing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

# Make-before-break: Envoy warms clusters until their endpoints arrive and
# listeners until their routes arrive, so on a change send in this order.
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
# Envoy subscribes to these by name; the other two are wildcard.
NAMED_TYPES = frozenset({ENDPOINT, ROUTE})


class InconsistentSnapshot(ValueError):
    """A snapshot references something it does not contain."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("inconsistent snapshot: " + "; ".join(problems))
        self.problems = problems


def resource_name(type_url: str, resource: Message) -> str:
    if type_url == ENDPOINT:
        return str(resource.cluster_name)
    return str(resource.name)


def resource_version(resource: Message) -> str:
    """Content hash: equal resources have equal versions across restarts and replicas."""
    return hashlib.sha256(resource.SerializeToString(deterministic=True)).hexdigest()[:16]


@dataclass(frozen=True)
class Resources:
    """One type's resources by name, with a per-resource content version.

    Each resource is packed into an Any once here, not once per stream.
    """

    by_name: Mapping[str, Message]
    versions: Mapping[str, str]
    packed: Mapping[str, any_pb2.Any] = field(default_factory=dict)

    @classmethod
    def of(cls, type_url: str, items: Iterable[Message]) -> Resources:
        by_name: dict[str, Message] = {}
        for item in items:
            name = resource_name(type_url, item)
            if name in by_name:
                raise InconsistentSnapshot([f"duplicate {short(type_url)} {name!r}"])
            by_name[name] = item
        versions = {name: resource_version(msg) for name, msg in by_name.items()}
        packed = {name: pack(msg) for name, msg in by_name.items()}
        return cls(MappingProxyType(by_name), MappingProxyType(versions), MappingProxyType(packed))


@dataclass(frozen=True)
class Snapshot:
    version: str
    resources: Mapping[str, Resources] = field(default_factory=dict)
    checked: bool = field(default=False, compare=False, repr=False)  # by build(): the cache need not check again

    @classmethod
    def build(
        cls,
        version: str,
        *,
        clusters: Iterable[Message] = (),
        endpoints: Iterable[Message] = (),
        listeners: Iterable[Message] = (),
        routes: Iterable[Message] = (),
    ) -> Snapshot:
        snapshot = cls(
            version,
            MappingProxyType(
                {
                    CLUSTER: Resources.of(CLUSTER, clusters),
                    ENDPOINT: Resources.of(ENDPOINT, endpoints),
                    LISTENER: Resources.of(LISTENER, listeners),
                    ROUTE: Resources.of(ROUTE, routes),
                }
            ),
        )
        problems = snapshot.consistency_problems()
        if problems:
            raise InconsistentSnapshot(problems)
        return replace(snapshot, checked=True)

    def of_type(self, type_url: str) -> Resources:
        return self.resources.get(type_url) or Resources({}, {})

    def packed(self, type_url: str, name: str) -> any_pb2.Any:
        return self.of_type(type_url).packed[name]

    def consistency_problems(self) -> list[str]:
        clusters = self.of_type(CLUSTER).by_name
        assignments = self.of_type(ENDPOINT).by_name
        routes = self.of_type(ROUTE).by_name
        problems: list[str] = []
        for name, cluster in clusters.items():
            if cluster.type == cluster_pb2.Cluster.EDS:
                service = cluster.eds_cluster_config.service_name or name
                if service not in assignments:
                    problems.append(f"cluster {name!r} uses EDS but has no load assignment")
        for name in assignments:
            if name not in clusters:
                problems.append(f"load assignment {name!r} has no cluster")
        for name, listener in self.of_type(LISTENER).by_name.items():
            for route_name, target in _listener_references(listener):
                if route_name and route_name not in routes:
                    problems.append(f"listener {name!r} needs route config {route_name!r}")
                if target and target not in clusters:
                    problems.append(f"listener {name!r} sends to missing cluster {target!r}")
        for name, route_config in routes.items():
            for target in _config_clusters(route_config):
                if target not in clusters:
                    problems.append(f"route config {name!r} sends to missing cluster {target!r}")
        return problems


def pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def short(type_url: str) -> str:
    """`type.googleapis.com/envoy.config.cluster.v3.Cluster` -> `Cluster` (for logs, metrics, pages)."""
    return type_url.rsplit(".", 1)[-1]


def _listener_references(listener: Message) -> Iterator[tuple[str, str]]:
    """(rds route config name, tcp_proxy cluster) pairs named by a listener's filters."""
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    for chain in chains:
        for flt in chain.filters:
            config = flt.typed_config
            if config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                hcm = hcm_pb2.HttpConnectionManager()
                config.Unpack(hcm)
                if hcm.HasField("rds"):
                    yield hcm.rds.route_config_name, ""
                elif hcm.HasField("route_config"):
                    for target in _config_clusters(hcm.route_config):
                        yield "", target
            elif config.Is(tcp_proxy_pb2.TcpProxy.DESCRIPTOR):
                proxy = tcp_proxy_pb2.TcpProxy()
                config.Unpack(proxy)
                if proxy.cluster:
                    yield "", proxy.cluster


def _config_clusters(route_config: Message) -> Iterator[str]:
    for vhost in route_config.virtual_hosts:
        yield from route_clusters(vhost.routes)


def route_clusters(routes: Iterable[Message]) -> set[str]:
    """Every cluster some route sends to: its cluster, weighted clusters and mirrors."""
    names: set[str] = set()
    for route in routes:
        if not route.HasField("route"):
            continue
        action = route.route
        if action.cluster:
            names.add(action.cluster)
        names.update(weighted.name for weighted in action.weighted_clusters.clusters)
        names.update(mirror.cluster for mirror in action.request_mirror_policies)
    return names
