"""Snapshots -> one static Envoy bootstrap, for `envoy --mode validate`. Pure: no I/O.

Every node's listeners are kept (renamed, on distinct placeholder ports: validate
mode binds nothing) with their route configurations inlined, and every cluster
becomes a static one: what Envoy checks in a route or listener does not depend
on where endpoints are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, json_format

from controlplane.xds.snapshot import CLUSTER, LISTENER, ROUTE, Snapshot, pack

HCM = "envoy.filters.network.http_connection_manager"
FIRST_PORT = 20000


def static_bootstrap(snapshots: Mapping[str, Snapshot]) -> dict[str, Any]:
    listeners, clusters = [], {}
    port = FIRST_PORT
    for node, snapshot in sorted(snapshots.items()):
        routes = snapshot.of_type(ROUTE).by_name
        for name, listener in sorted(snapshot.of_type(LISTENER).by_name.items()):
            copy = type(listener)()
            copy.CopyFrom(listener)
            copy.name = f"{node}/{name}"
            if copy.address.HasField("socket_address"):
                copy.address.socket_address.address, copy.address.socket_address.port_value = "127.0.0.1", port
                port += 1
            for chain in copy.filter_chains:
                for f in chain.filters:
                    if f.name == HCM:
                        f.typed_config.CopyFrom(pack(_inline_routes(f.typed_config, routes)))
            listeners.append(json_format.MessageToDict(copy, preserving_proto_field_name=True))
        for name, cluster in snapshot.of_type(CLUSTER).by_name.items():
            if name not in clusters:
                clusters[name] = json_format.MessageToDict(_static(cluster), preserving_proto_field_name=True)
    return {"static_resources": {"listeners": listeners, "clusters": [clusters[n] for n in sorted(clusters)]}}


def _inline_routes(
    packed: any_pb2.Any, routes: Mapping[str, route_pb2.RouteConfiguration]
) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager()
    packed.Unpack(hcm)
    if hcm.HasField("rds"):
        hcm.route_config.CopyFrom(routes[hcm.rds.route_config_name])
        hcm.ClearField("rds")
    return hcm


def _static(cluster: cluster_pb2.Cluster) -> cluster_pb2.Cluster:
    copy = cluster_pb2.Cluster()
    copy.CopyFrom(cluster)
    if copy.type == cluster_pb2.Cluster.EDS:
        copy.type = cluster_pb2.Cluster.STATIC
        copy.ClearField("eds_cluster_config")
        copy.load_assignment.cluster_name = copy.name
    return copy
