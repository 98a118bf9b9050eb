"""Where a sender reaches each model version: passing instances through their sidecar's ingress, or, on the
sender's own host, at the runtime's Unix socket (docs/architecture.md, "Same host"). Pure: no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_components_pb2 as rc

from contract.naming import cluster_model
from contract.service import RuntimeService
from controlplane.translate import resources as r
from controlplane.translate import security
from controlplane.translate.routes import steered
from controlplane.xds.snapshot import route_clusters

Reach = dict[str, tuple[tuple[str, int, str], ...]]  # cluster -> (host, ingress port, runtime socket) passing


class Endpoints:
    """Cluster name -> its endpoints as Envoy addresses, built when a snapshot first asks for them."""

    def __init__(self, reach: Reach, at_activator: frozenset[str] = frozenset()) -> None:
        self.reach = reach
        self.at_activator = at_activator  # clusters reached at the control plane's activator (plaintext loopback)
        self._built: dict[tuple[str, str], tuple[list[r.Address], list[r.Address]]] = {}

    def get(self, cluster: str, near: str = "") -> tuple[list[r.Address], list[r.Address]]:
        """(through their sidecar's ingress, straight to the runtime's socket): an instance on host `near`
        (the sender's own) is reached at its runtime's Unix socket; "": every instance through its ingress."""
        if (cluster, near) not in self._built:
            found: tuple[list[r.Address], list[r.Address]] = ([], [])
            for host, port, socket in self.reach.get(cluster, ()):
                if near and host == near and socket:
                    found[1].append(r.pipe_address(socket))
                else:
                    found[0].append(r.tcp_address(host, port))
            self._built[cluster, near] = found
        return self._built[cluster, near]


def endpoints_of(instances: Iterable[RuntimeService], parked: Iterable[tuple[str, str, int]] = ()) -> Endpoints:
    """Every cluster's passing endpoints as plain values (Endpoints turns them into addresses).

    A scaled-to-zero version without a passing replica is reached at its activator instead.
    """
    found: dict[str, list[tuple[str, int, str]]] = {}
    for i in sorted(instances, key=lambda i: i.service_id):
        if i.passing:  # a server we do not run (OIP) has no socket of ours: always through its sidecar
            found.setdefault(i.cluster, []).append((i.host, i.ingress_port, "" if i.oip_model else i.runtime_uds))
    at_activator = frozenset(cluster for cluster, _, _ in parked if cluster not in found)
    for cluster, host, port in parked:
        found.setdefault(cluster, [(host, port, "")])
    return Endpoints({cluster: tuple(hosts) for cluster, hosts in found.items()}, at_activator)


def remote_clusters(
    routes: Sequence[rc.Route], endpoints: Endpoints, tls_dir: str = "", near: str = ""
) -> list[tuple[cluster_pb2.Cluster, endpoint_pb2.ClusterLoadAssignment]]:
    """A cluster per model version the routes send to. With `near` (the sender's host), the instances of a
    version that only steered routes send to (no mirror, ensemble member or OIP model) and that run on that
    host are reached at their runtime's socket, skipping their sidecar (docs/architecture.md, "Same host")."""
    direct = steered_only(routes) if near else frozenset()
    found = []
    for name in sorted(route_clusters(routes)):
        cluster = r.eds_cluster(name)
        through_ingress, at_socket = endpoints.get(name, near if name in direct else "")
        if tls_dir and name not in endpoints.at_activator:  # an activator speaks plaintext
            cluster.transport_socket.CopyFrom(security.upstream_tls(tls_dir, cluster_model(name)))
            if at_socket:
                cluster.transport_socket_matches.append(r.PLAIN_AT_SOCKET)
        found.append((cluster, r.load_assignment(name, through_ingress, at_socket)))
    return found


def steered_only(routes: Sequence[rc.Route]) -> frozenset[str]:
    """Clusters that no route reaches without telling the runtime its stage (only its ingress could)."""
    steered_to: set[str] = set()
    other: set[str] = set()
    for route in routes:
        if route.HasField("route"):
            names = route_clusters([route])
            mirrors = {m.cluster for m in route.route.request_mirror_policies}
            (steered_to if steered(route) else other).update(names - mirrors)
            other.update(mirrors)
    return frozenset(steered_to - other)


def only_serving(routes: list[rc.Route], reach: Reach) -> list[rc.Route]:
    """A split leaves out variants with no passing instance while another variant has one.

    Envoy picks a weighted cluster before it looks for a host, and a retry stays
    in that cluster: a variant whose instances all fail their checks would fail
    its whole share. Its share goes to the others until it is back.
    """
    for route in routes:
        weighted = route.route.weighted_clusters.clusters if route.HasField("route") else []
        serving = [(c.name, c.weight.value) for c in weighted if reach.get(c.name)]
        if serving and len(serving) < len(weighted):
            route.route.ClearField("weighted_clusters")
            r.set_clusters(route.route, serving)
    return routes
