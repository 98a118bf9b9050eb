"""mTLS on every hop, authorization from the pipeline graph, xDS bound to certificates — through real
Consul (its Connect CA), real Envoys and the real control plane. One deployment for the module, on a
Consul of its own: the last test rotates its CA."""

from __future__ import annotations

import functools
import http.client
import json
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.node import processes
from controlplane.node.processes import ManagedProcess
from tests.helpers.components import ConsulAgent, ControlPlaneProc, consul_passing, start_consul
from tests.helpers.envoy import admin_stat
from tests.helpers.paths import short_dir

pytestmark = pytest.mark.slow
LISTENERS = "type.googleapis.com/envoy.config.listener.v3.Listener"
PIPELINE = """
kind: Pipeline
name: secure
transport: http
stages:
  - {name: tokenize, variants: [{model: tokenize, version: v1}]}
  - {name: count, variants: [{model: count, version: v1}]}
  - {name: score, variants: [{model: score, version: v1}]}
"""


@dataclass
class Deployment:
    consul: ConsulAgent
    plane: ControlPlaneProc
    gateway_admin: int
    runtimes: dict[str, str]  # model -> service id
    envoys: list[int]  # admin ports of every Envoy (gateway first)

    def consul_get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.consul.http_port}{path}", timeout=10) as answer:
            return json.load(answer)

    def meta(self, model: str) -> dict[str, str]:
        return dict(self.consul_get(f"/v1/agent/service/{self.runtimes[model]}")["Meta"])

    def leaf(self, service: str, folder: Path) -> tuple[Path, Path, str]:
        """A certificate for `service` from the CA (any local process can get one from a dev agent)."""
        leaf = self.consul_get(f"/v1/agent/connect/ca/leaf/{service}")
        cert, key = folder / f"{service}.pem", folder / f"{service}.key"
        cert.write_text(leaf["CertPEM"])
        key.write_text(leaf["PrivateKeyPEM"])
        return cert, key, self.roots()

    def roots(self) -> str:
        return "\n".join(r["RootCert"] for r in self.consul_get("/v1/agent/connect/ca/roots")["Roots"])

    def serials(self) -> list[str]:
        """The serial of the certificate each Envoy presents now (Envoy's admin /certs)."""
        found = []
        for port in self.envoys:
            certs = json.loads(processes.http_get(f"http://127.0.0.1:{port}/certs")[1])["certificates"]
            found.append(",".join(sorted({c["serial_number"] for e in certs for c in e.get("cert_chain", [])})))
        return found


def gateway_call(plane: ControlPlaneProc, text: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{plane.gateway_port}/pipelines/secure",
        data=json.dumps({"text": text}).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as err:
        return err.code, {"body": err.read()[:300].decode(errors="replace")}


@pytest.fixture(scope="module")
def secure(logs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    state, run_dir = tmp_path_factory.mktemp("sec"), str(short_dir("sec-"))
    started: list[ManagedProcess] = []
    consul = start_consul(logs_dir, tmp_path_factory.mktemp("consul-sec"))
    plane = ControlPlaneProc(
        processes.free_port(),
        processes.free_port(),
        consul.http_port,
        f"sec-{uuid.uuid4().hex[:8]}/",
        logs_dir / "controlplane-sec.log",
        processes.free_port(),
        extra_args=["--security=mtls", f"--gateway-tls-dir={state / 'gateway-tls'}"],
    )  # a process only once started: from here on, whatever fails stops what was started
    try:
        plane.start()
        me = [sys.executable, "-m", "controlplane.cli"]
        consul_flag = f"--consul=127.0.0.1:{consul.http_port}"
        gateway = ManagedProcess(
            "gateway",
            [
                *me,
                "sidecar",
                "--node-id=gateway",
                "--cluster=gateway",
                f"--xds={plane.xds_addr}",
                f"--admin-port={plane.gateway_admin_port}",
                f"--config-dir={state}",
                "--security=mtls",
                consul_flag,
            ],
            logs_dir / "gateway-sec.log",
        ).start()
        started.append(gateway)
        gateway.wait_ready(processes.envoy_ready(plane.gateway_admin_port), timeout=30)
        runtimes = {}
        for model in ("tokenize", "count", "score"):
            service_id = f"{model}-v1-{uuid.uuid4().hex[:6]}"
            runtime = ManagedProcess(
                service_id,
                [
                    *me,
                    "runtime",
                    f"examples.trivial.models:{model}",
                    f"--model={model}",
                    "--version=v1",
                    f"--service-id={service_id}",
                    consul_flag,
                    f"--xds={plane.xds_addr}",
                    "--security=mtls",
                    "--drain-seconds=0.5",
                ],
                logs_dir / f"{service_id}.log",
                env={"MLLAMBDA_RUN_DIR": run_dir},
            ).start()
            started.append(runtime)
            runtimes[model] = service_id
        for model, service_id in runtimes.items():
            started[0].wait_ready(functools.partial(consul_passing, consul.http_port, model, service_id), timeout=45)
        (state / "pipeline.yaml").write_text(PIPELINE)
        applied = plane.cli("apply", "-f", str(state / "pipeline.yaml"), "--wait")
        assert applied.returncode == 0, applied.stdout + applied.stderr
        deployment = Deployment(consul, plane, plane.gateway_admin_port, runtimes, [plane.gateway_admin_port])
        deployment.envoys += [int(deployment.meta(m)["envoy_admin_port"]) for m in runtimes]
        yield deployment
    finally:
        for proc in reversed(started):
            proc.stop()
        plane.stop()
        consul.proc.stop()
    left = sorted(p.name for p in Path(run_dir).iterdir() if p.name.endswith("-tls"))
    assert not left, f"a stopped runtime left its certificate folder (it holds the key): {left}"


def test_the_pipeline_answers_end_to_end_with_every_hop_on_mtls(secure: Deployment) -> None:
    def through_ingress() -> list[int]:  # requests each stage's sidecar passed from its ingress to its runtime
        return [admin_stat(port, "cluster.local-http.upstream_rq_total") for port in secure.envoys[1:]]

    before = through_ingress()
    status, body = gateway_call(secure.plane, "one two three")
    assert status == 200, body
    assert body["score"] == 3 * 10  # tokenize -> count -> score
    # All on one host: each hop went from the sender's sidecar to the next runtime's socket (plaintext in
    # an mTLS cluster, by endpoint metadata), no ingress on the way (docs/architecture.md, "Same host").
    assert through_ingress() == before
    assert Path(secure.meta("count")["tls_dir"]).is_dir()  # removed when the runtime stops (the fixture checks)
    # Each Envoy presents a Connect leaf naming its own identity.
    certs = json.loads(processes.http_get(f"http://127.0.0.1:{secure.gateway_admin}/certs")[1])["certificates"]
    uris = {san["uri"] for e in certs for c in e.get("cert_chain", []) for san in c["subject_alt_names"]}
    assert any(u.endswith("/svc/mllambda-gateway") for u in uris), uris


def test_a_plain_http_client_is_refused_by_a_sidecar_ingress(secure: Deployment) -> None:
    port = int(secure.meta("count")["ingress_port"])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine)):
        connection.request("POST", "/pipelines/secure/v1/count", body=b"{}")
        connection.getresponse()


def _post_tls(port: int, path: str, cert: Path, key: Path, roots: str, body: dict[str, Any]) -> tuple[int, str]:
    context = ssl.create_default_context(cadata=roots)
    context.check_hostname = False  # SPIFFE identities are URIs: the chain is what we check here
    context.load_cert_chain(cert, key)
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    connection.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
    answer = connection.getresponse()
    return answer.status, answer.read().decode(errors="replace")


def test_a_stage_admits_only_the_identities_the_pipeline_graph_names(secure: Deployment, tmp_path: Path) -> None:
    port = int(secure.meta("count")["ingress_port"])
    path = "/pipelines/secure/v1/count"
    payload = {"tokens": ["a", "b"]}
    # A valid certificate from the same CA, for a service the pipeline does not name: 403.
    cert, key, roots = secure.leaf("intruder", tmp_path)
    status, body = _post_tls(port, path, cert, key, roots, payload)
    assert status == 403, body
    # The gateway may call stage 0 only, not stage 1.
    cert, key, roots = secure.leaf("mllambda-gateway", tmp_path)
    assert _post_tls(port, path, cert, key, roots, payload)[0] == 403
    # The previous stage's model may: the same request goes through to the runtime.
    cert, key, roots = secure.leaf("tokenize", tmp_path)
    status, body = _post_tls(port, path, cert, key, roots, payload)
    assert status == 200, body
    # And the pipeline itself still answers end to end.
    assert gateway_call(secure.plane, "x y")[0] == 200


def _call_tls(port: int, method: str, path: str, cert: Path, key: Path, roots: str) -> tuple[int, str]:
    context = ssl.create_default_context(cadata=roots)
    context.check_hostname = False
    context.load_cert_chain(cert, key)
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    connection.request(method, path)
    answer = connection.getresponse()
    return answer.status, answer.read().decode(errors="replace")


async def test_the_control_plane_reads_a_sidecars_counters_through_its_ingress_and_nobody_else_can(
    secure: Deployment, tmp_path: Path
) -> None:
    """How the control plane reads Envoys on other hosts (their admin stays on loopback): GET /stats on the
    mTLS ingress, for its own identity only. Read with the scraper the control plane uses."""
    from controlplane.consul.certs import Identity, client_context
    from controlplane.delivery.traffic import STATS, TrafficScraper

    assert gateway_call(secure.plane, "a b c")[0] == 200  # count's Envoy has sent to score
    port = int(secure.meta("count")["ingress_port"])
    for caller in ("intruder", "tokenize", "mllambda-gateway"):
        cert, key, roots = secure.leaf(caller, tmp_path)
        assert _call_tls(port, "GET", "/stats", cert, key, roots)[0] == 403, caller
    cert, key, roots = secure.leaf("mllambda-control-plane", tmp_path)
    for method, path in (("POST", "/stats"), ("GET", "/config_dump"), ("POST", "/quitquitquit"), ("GET", "/")):
        assert _call_tls(port, method, path, cert, key, roots)[0] in (403, 404), (method, path)
    identity = Identity("mllambda-control-plane", cert.read_text(), key.read_text(), roots, "")
    scraper = TrafficScraper()
    scraper.tls = client_context(identity, tmp_path / "keys")
    stats = await scraper.read([f"https://127.0.0.1:{port}{STATS}"])
    assert stats["score.v1"].requests >= 1, stats  # what count's own Envoy sent on to the next stage
    # The runtime's profiles, for model monitoring, the same way and to the same identity only.
    status, body = _call_tls(port, "GET", "/profiles?after=0", cert, key, roots)
    assert status == 200 and json.loads(body)["window_seconds"] == 10, body
    for caller in ("intruder", "tokenize"):
        other_cert, other_key, _ = secure.leaf(caller, tmp_path)
        assert _call_tls(port, "GET", "/profiles?after=0", other_cert, other_key, roots)[0] == 403, caller
    assert gateway_call(secure.plane, "still up")[0] == 200  # nothing above stopped or changed an Envoy


def _ads(secure: Deployment, node_id: str, credentials: grpc.ChannelCredentials | None, name: str = "") -> Any:
    """One ADS request for listeners as `node_id`; the first response, or the gRPC error."""
    options = [("grpc.ssl_target_name_override", name)] if name else []
    if credentials is None:
        channel = grpc.insecure_channel(secure.plane.xds_addr)
    else:
        channel = grpc.secure_channel(secure.plane.xds_addr, credentials, options=options)
    request = discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=node_id, cluster=node_id), type_url=LISTENERS)
    try:
        stream = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
            iter([request]), timeout=5
        )
        return next(iter(stream))
    except grpc.RpcError as err:
        return err
    finally:
        channel.close()


def _server_name(secure: Deployment, tmp_path: Path) -> str:
    """The control plane's certificate has no DNS name; gRPC's host check falls back to its common name."""
    cert, _, _ = secure.leaf("mllambda-control-plane", tmp_path)
    subject = dict(pair[0] for pair in ssl._ssl._test_decode_cert(str(cert))["subject"])  # type: ignore[attr-defined]
    return str(subject["commonName"])


def test_xds_needs_a_client_certificate_and_serves_each_identity_only_its_own_node(
    secure: Deployment, tmp_path: Path
) -> None:
    refused = _ads(secure, "gateway", None)
    assert isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.UNAVAILABLE

    name = _server_name(secure, tmp_path)

    def as_service(service: str) -> grpc.ChannelCredentials:
        cert, key, roots = secure.leaf(service, tmp_path)
        return grpc.ssl_channel_credentials(roots.encode(), key.read_bytes(), cert.read_bytes())

    # No client certificate over TLS: the handshake fails.
    anonymous = grpc.ssl_channel_credentials(secure.roots().encode())
    refused = _ads(secure, "gateway", anonymous, name)
    assert isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.UNAVAILABLE
    # A certificate for service A asking as node B: refused, and nothing recorded for B.
    before = secure.plane.cli("describe", "pipeline", "secure").stdout
    for service, node in (("intruder", "gateway"), ("tokenize", secure.runtimes["count"]), ("tokenize", "gateway")):
        refused = _ads(secure, node, as_service(service), name)
        assert isinstance(refused, grpc.RpcError), (service, node)
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED, refused.details()
        assert f"certificate for {service!r}" in (refused.details() or "")
    assert secure.plane.cli("describe", "pipeline", "secure").stdout.count("gateway") == before.count("gateway")
    # The right certificate for the right node gets its config.
    answer = _ads(secure, "gateway", as_service("mllambda-gateway"), name)
    assert not isinstance(answer, grpc.RpcError), answer
    assert [r.type_url for r in answer.resources] == [LISTENERS]


def test_a_ca_rotation_under_steady_load_fails_no_request(secure: Deployment, tmp_path: Path) -> None:
    """Consul re-issues every leaf (new root, cross-signed); each Envoy's launcher swaps its files."""
    before = secure.serials()
    results: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            results.append(gateway_call(secure.plane, "rotate me now")[0])

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        key = tmp_path / "ca.key"
        subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)], check=True)
        config = {"Provider": "consul", "Config": {"PrivateKey": key.read_text(), "LeafCertTTL": "72h"}}
        request = urllib.request.Request(
            f"http://127.0.0.1:{secure.consul.http_port}/v1/connect/ca/configuration",
            data=json.dumps(config).encode(),
            method="PUT",
        )
        urllib.request.urlopen(request, timeout=10).close()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            now = secure.serials()
            if all(a != b for a, b in zip(before, now, strict=True)):
                break
            time.sleep(0.5)
        assert all(a != b for a, b in zip(before, secure.serials(), strict=True)), "some Envoy kept its old leaf"
        time.sleep(2)  # traffic on the new certificates only
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    failed = [code for code in results if code != 200]
    assert len(results) > 100 and not failed, f"{len(failed)} of {len(results)} failed: {sorted(set(failed))}"
    # xDS still works after the rotation: a new version reaches the gateway.
    (tmp_path / "p.yaml").write_text(PIPELINE.replace("score, version: v1}]}", "score, version: v1, weight: 2}]}"))
    applied = secure.plane.cli("apply", "-f", str(tmp_path / "p.yaml"), "--wait", "--timeout", "30")
    assert applied.returncode == 0, applied.stdout + applied.stderr
