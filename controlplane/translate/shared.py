"""The gateway Envoy as the one Envoy of its host: it takes the output of the runtimes there too, so a hop on
that host passes one Envoy process that is busy anyway, not the sender's sidecar (docs/architecture.md,
"One Envoy for the host"). The sidecar keeps the same egress routes: the runtime SDK falls back to it for
whatever the gateway cannot do (runtime_sdk/egress.py). Pure: no I/O."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence

from envoy.config.core.v3 import base_pb2 as core
from envoy.config.route.v3 import route_components_pb2 as rc

from contract import headers as h
from contract.service import RuntimeService, shared_egress_socket
from controlplane.pipeline.model import PipelineVersion
from controlplane.translate.endpoints import Endpoints, steered_only
from controlplane.translate.resources import header
from controlplane.translate.routes import dedupe, hops
from controlplane.xds.snapshot import route_clusters

Carrier = tuple[RuntimeService, tuple[PipelineVersion, ...]]  # a runtime on the gateway's host, what it serves


def shares_egress(instances: Sequence[RuntimeService], gateway_host: str, run_folder: str) -> list[RuntimeService]:
    """The runtimes whose output the gateway takes: on its host, with their egress socket in the control plane's
    run folder (the gateway binds a socket next to it, and Envoy replaces a file in its way: never elsewhere),
    at a path no other registration names (two listeners on one path would fail the gateway's update)."""
    if not run_folder:
        return []
    named = Counter(p for i in instances for p in (i.runtime_uds, i.egress_uds, shared_egress_socket(i.egress_uds)))
    return [
        i
        for i in instances
        if i.host == gateway_host
        and os.path.dirname(i.egress_uds) == run_folder
        and named[shared_egress_socket(i.egress_uds)] == 1
    ]


def shared_egress(
    carriers: Sequence[Carrier], own: Sequence[rc.Route], endpoints: Endpoints, mtls_host: str = ""
) -> list[tuple[RuntimeService, list[rc.Route]]]:
    """Each carrier's egress routes, as its sidecar has them (none: it sends nowhere, or not through here).

    Under mTLS (`mtls_host`: the gateway's host) the gateway holds only its own identity: it takes a runtime's
    output only when every hop of it goes to a runtime's socket on this host or to an activator (plaintext,
    no identity); else the runtime's sidecar keeps it. Routes the gateway has itself (`own`) count: a
    cluster one of them mirrors is reached through its ingress.
    """
    found = [(me, dedupe([route for v in mine for route in hops(v, me, "")[1]])) for me, mine in carriers]
    if not mtls_host:
        return found
    direct = steered_only([*own, *(route for _, out in found for route in out)])

    def plain(cluster: str) -> bool:  # an activator speaks plaintext on loopback: no identity either
        return cluster in endpoints.at_activator or (cluster in direct and not endpoints.get(cluster, mtls_host)[0])

    return [(me, out if all(plain(c) for c in route_clusters(out)) else []) for me, out in found]


def not_carried_here() -> rc.Route:
    """The last route of every shared listener: a path the gateway does not carry for this runtime (yet, or
    any more) gets Envoy's own kind of answer, a 503 marked retriable, and the runtime sends it through its
    sidecar instead. A listener is never taken away while its runtime is registered on the host (a removed
    listener drains for minutes with its last routes); what the gateway carries changes by its routes only."""
    body = json.dumps({"error": "not carried by the gateway: the runtime's own sidecar takes it"})
    return rc.Route(
        name="not-carried",
        match=rc.RouteMatch(prefix="/"),
        direct_response=rc.DirectResponseAction(status=503, body=core.DataSource(inline_string=body)),
        response_headers_to_add=[header(h.RETRIABLE, "true")],
    )
