"""A runtime on the sender's own host is reached at its socket, skipping its sidecar (docs/architecture.md,
"Same host"): the translation here on plain data, the data path through real Envoys in tests/test_colocated_e2e.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from contract import headers as h
from contract.service import RuntimeService
from controlplane.pipeline.spec import parse_pipeline
from controlplane.translate import resources as r
from controlplane.translate.pipelines import Options, translate
from controlplane.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, Snapshot
from tests.helpers.translation import PIPELINE, RUNTIMES, entries, instance, routes, steady

PASSING = [dataclasses.replace(i, passing=True) for i in RUNTIMES] + [instance("mb", "v3", 4), instance("mx", "v1", 5)]


def reached(snapshot: Snapshot, cluster: str) -> list[str]:
    """Each endpoint as "pipe:PATH" or "tcp:PORT"."""
    found = []
    for e in snapshot.of_type(ENDPOINT).by_name[cluster].endpoints[0].lb_endpoints:
        a = e.endpoint.address
        found.append(f"pipe:{a.pipe.path}" if a.HasField("pipe") else f"tcp:{a.socket_address.port_value}")
    return found


def added(route: Any) -> dict[str, str]:
    return {x.header.key: x.header.value for x in route.request_headers_to_add}


def test_a_runtime_on_the_senders_host_is_reached_at_its_socket_one_elsewhere_at_its_ingress() -> None:
    elsewhere = dataclasses.replace(instance("mb", "v1", 6), host="10.0.0.6")
    snapshots = translate(steady(PIPELINE), [*PASSING, elsewhere])
    sidecar = snapshots["ma-v1-1"]
    assert reached(sidecar, "mb.v1") == ["tcp:8006", "pipe:/run/mb-2.sock"]
    assert reached(sidecar, "mb.v2") == ["pipe:/run/mb-3.sock"]
    assert reached(snapshots["gateway"], "ma.v1") == ["pipe:/run/ma-1.sock"]  # the gateway's host too
    # A sender on another host reaches every instance through its ingress.
    far = dataclasses.replace(instance("ma", "v1", 7), host="10.0.0.7")
    assert reached(translate(steady(PIPELINE), [*PASSING, far])["ma-v1-7"], "mb.v1") == ["tcp:8002"]
    # Off: every hop through the ingress, as before.
    off = translate(steady(PIPELINE), PASSING, Options(colocated="ingress"))["ma-v1-1"]
    assert reached(off, "mb.v1") == ["tcp:8002"]


def test_a_mirror_target_stays_behind_its_ingress_which_marks_the_copy_as_a_shadow() -> None:
    sidecar = translate(steady(PIPELINE), PASSING)["ma-v1-1"]
    assert reached(sidecar, "mb.v3") == ["tcp:8004"]  # only its ingress tells a mirrored copy from a request


def test_the_sender_says_what_the_ingress_would_and_drops_what_a_caller_forged() -> None:
    snapshots = translate(steady(PIPELINE), PASSING)
    (into_b,) = [x for x in routes(snapshots["ma-v1-1"], "egress") if x.match.path == "/pipelines/p/v1/b"]
    (ingress_b,) = [x for x in routes(snapshots["mb-v1-2"], "ingress") if x.match.path == "/pipelines/p/v1/b"]
    assert (
        added(into_b)
        == added(ingress_b)
        == {
            h.STAGE: "b",
            h.TRANSPORT: "http",
            h.NEXT: "/pipelines/p/v1/c",
            h.BRANCH_FIELD: "category",
            h.AGREE: "1",  # b has a shadow: its answers are kept for their agreement
            h.MAX_BODY: str(PIPELINE.max_body),  # the pipeline's body limit, which the runtime enforces too
        }
    )
    assert set(h.STEERING) <= set(into_b.request_headers_to_remove)
    entry = entries(snapshots["gateway"])[0]
    assert added(entry)[h.NEXT] == "/pipelines/p/v1/b" and set(h.STEERING) <= set(entry.request_headers_to_remove)
    # The last stage's senders (one route per branch key) tell it that nothing follows.
    (into_c, _unknown) = [x for x in routes(snapshots["mb-v1-2"], "egress") if x.match.path == "/pipelines/p/v1/c"]
    assert h.NEXT not in added(into_c) and added(into_c)[h.STAGE] == "c"


def test_under_mtls_socket_endpoints_are_plaintext_and_the_others_keep_verifying_their_peer() -> None:
    secured = [dataclasses.replace(i, tls_dir=f"/certs/{i.service_id}") for i in PASSING]
    elsewhere = dataclasses.replace(instance("mb", "v1", 6), host="10.0.0.6", tls_dir="/certs/x")
    options = Options(mtls=True, gateway_tls_dir="/certs/gateway")
    sidecar = translate(steady(PIPELINE), [*secured, elsewhere], options)["ma-v1-1"]
    cluster = sidecar.of_type(CLUSTER).by_name["mb.v1"]
    assert cluster.transport_socket.name == "envoy.transport_sockets.tls"  # the default: verify the peer
    (match,) = cluster.transport_socket_matches
    assert match.transport_socket.name == "envoy.transport_sockets.raw_buffer"
    marks = [
        dict(e.metadata.filter_metadata["envoy.transport_socket_match"])
        for e in sidecar.of_type(ENDPOINT).by_name["mb.v1"].endpoints[0].lb_endpoints
    ]
    assert marks == [{}, {r.AT_SOCKET: True}]  # the other host's ingress over mTLS, the socket in plaintext
    assert list(match.match.fields) == [r.AT_SOCKET]
    mirror = sidecar.of_type(CLUSTER).by_name["mb.v3"]
    assert not mirror.transport_socket_matches  # no endpoint at a socket: nothing to match


def test_a_server_we_do_not_run_and_ensemble_members_stay_behind_their_ingress() -> None:
    oip = dataclasses.replace(instance("mb", "v1", 2), oip_model="mb")
    assert reached(translate(steady(PIPELINE), [*PASSING[:1], oip])["ma-v1-1"], "mb.v1") == ["tcp:8002"]
    ensemble = parse_pipeline(
        {
            "name": "e",
            "stages": [
                {"name": "a", "variants": [{"model": "ma", "version": "v1"}]},
                {
                    "name": "vote",
                    "members": [
                        {"name": "one", "variants": [{"model": "mb", "version": "v1"}]},
                        {"name": "two", "variants": [{"model": "mb", "version": "v2"}]},
                    ],
                    "join": {"model": "mx", "version": "v1"},
                },
            ],
        }
    )
    sidecar = translate(steady(ensemble), PASSING)["ma-v1-1"]
    assert reached(sidecar, "mb.v1") == ["tcp:8002"] and reached(sidecar, "mb.v2") == ["tcp:8003"]
    assert reached(sidecar, "mx.v1") == ["pipe:/run/mx-5.sock"]  # the join sends on, as a stage's variant does


def test_a_runtime_in_a_deep_folder_offers_no_egress_socket_and_one_whose_own_socket_cannot_fit_says_so(
    tmp_path: Path,
) -> None:
    """Other Envoys connect to the runtime's socket, so its registration must carry a path Envoy takes."""
    from controlplane.cli import build_parser
    from controlplane.errors import CliError
    from controlplane.node.launch import plan_service

    def plan(folder: Path) -> RuntimeService:
        args = build_parser().parse_args(["runtime", "m:f", "--model=m", "--version=v1", "--service-id=m-1"])
        return plan_service(args, folder, kafka=False)

    deep = Path("/" + "d" * 95)  # m-1.sock fits (105 bytes); m-1-egress.sock does not (112)
    planned = plan(deep)
    assert planned.runtime_uds == f"{deep}/m-1.sock" and planned.egress_uds == ""  # forwards over TCP instead
    assert (
        RuntimeService.from_entry(
            {"Service": {"ID": "m-1", "Address": "127.0.0.1", "Meta": planned.to_meta()}, "Node": {}, "Checks": []}
        ).egress_uds
        == ""
    )
    with pytest.raises(CliError, match="MLLAMBDA_RUN_DIR"):
        plan(Path("/" + "d" * 110))


SHARED = Options(run_folder="/run")  # the control plane's run folder: the gateway takes its runtimes' output


def listeners(snapshot: Snapshot) -> dict[str, str]:
    return {x.name: x.address.pipe.path for x in snapshot.of_type(LISTENER).by_name.values()}


def carried(snapshot: Snapshot, runtime: str) -> list[Any]:
    """The routes the gateway carries for a runtime, before its last route: "not carried here" (503, retriable)."""
    *found, last = routes(snapshot, f"egress-{runtime}")
    assert last.direct_response.status == 503 and added_to_response(last) == {h.RETRIABLE: "true"}
    return found


def added_to_response(route: Any) -> dict[str, str]:
    return {x.header.key: x.header.value for x in route.response_headers_to_add}


def test_the_gateway_takes_the_output_of_runtimes_on_its_host_with_the_routes_their_sidecar_has() -> None:
    elsewhere = dataclasses.replace(instance("mb", "v1", 6), host="10.0.0.6")
    snapshots = translate(steady(PIPELINE), [*PASSING, elsewhere], SHARED)
    gateway = snapshots["gateway"]
    assert listeners(gateway) == {
        "gateway": "",
        **{f"egress-{i.service_id}": i.egress_uds.replace("-egress.sock", "@host.sock") for i in PASSING},
    }  # every runtime on its host, serving or not: a listener is never taken away while its runtime is there
    for runtime in ("ma-v1-1", "mb-v1-2"):
        sidecar = [x for x in routes(snapshots[runtime], "egress") if x.name != "readyz"]
        assert carried(gateway, runtime) == sidecar  # the sidecar keeps them: the runtime's fallback
    assert carried(gateway, "mx-v1-5") == carried(gateway, "mb-v3-4") == []  # the last stage, a shadow: nowhere
    # The gateway reaches the next stage as the sidecar would: its host's runtimes at their socket.
    assert reached(gateway, "mb.v1") == reached(snapshots["ma-v1-1"], "mb.v1") == ["tcp:8006", "pipe:/run/mb-2.sock"]
    assert translate(steady(PIPELINE), PASSING, dataclasses.replace(SHARED, colocated="direct"))["gateway"].of_type(
        LISTENER
    ).by_name.keys() == {"gateway"}


def test_the_gateway_binds_only_in_its_own_run_folder_and_never_on_a_path_two_registrations_name() -> None:
    """Envoy replaces whatever file is at a listener's path, and two listeners on one path fail its update."""
    outside = dataclasses.replace(instance("ma", "v1", 1), egress_uds="/home/someone/ma-1-egress.sock")
    twin = dataclasses.replace(instance("mb", "v1", 2), egress_uds="/run/ma-1-egress.sock")  # claims ma-1's
    squatter = dataclasses.replace(instance("mx", "v1", 5), runtime_uds="/run/mb-3@host.sock")  # mb-3's shared one
    gateway = translate(steady(PIPELINE), [*PASSING[:1], twin, *PASSING[2:4], squatter], SHARED)["gateway"]
    assert "egress-ma-v1-1" not in listeners(gateway) and "egress-mb-v1-2" not in listeners(gateway)
    assert "egress-mb-v2-3" not in listeners(gateway)
    gateway = translate(steady(PIPELINE), [outside, *PASSING[1:]], SHARED)["gateway"]
    assert "egress-ma-v1-1" not in listeners(gateway) and "egress-mb-v1-2" in listeners(gateway)


def test_under_mtls_the_gateway_takes_only_output_that_stays_on_its_host() -> None:
    """The gateway has its own identity only: a hop to another host keeps the runtime's sidecar (its identity).
    Its listener stays, with nothing but "not carried here": the runtime's sidecar takes everything."""
    secured = [dataclasses.replace(i, tls_dir=f"/certs/{i.service_id}") for i in PASSING]
    options = dataclasses.replace(SHARED, mtls=True, gateway_tls_dir="/certs/gateway")
    assert carried(translate(steady(PIPELINE), secured, options)["gateway"], "ma-v1-1") == []  # mb.v3: a mirror
    stages = [{"name": n, "variants": [{"model": m, "version": "v1"}]} for n, m in (("a", "ma"), ("b", "mb"))]
    plain = parse_pipeline({"name": "q", "stages": stages})
    gateway = translate(steady(plain), secured, options)["gateway"]
    assert carried(gateway, "ma-v1-1") != [] and reached(gateway, "mb.v1") == ["pipe:/run/mb-2.sock"]
    far = dataclasses.replace(instance("mb", "v1", 6), host="10.0.0.6", tls_dir="/certs/far")
    assert carried(translate(steady(plain), [*secured, far], options)["gateway"], "ma-v1-1") == []
    # A version scaled to zero is reached at its activator, plaintext on loopback: carried.
    idle = dataclasses.replace(options, parked=(("mb.v1", "127.0.0.1", 5555),))
    assert carried(translate(steady(plain), secured[:1], idle)["gateway"], "ma-v1-1") != []
