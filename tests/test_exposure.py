"""Nothing beyond loopback without authentication; no runtime or Envoy inherits a credential."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from controlplane.listen import is_loopback, refuse_exposed
from controlplane.node import processes
from tests.helpers.pipelines import apply, until_ok


def test_loopback_is_told_apart_from_everything_else() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.internal", ""))
    refuse_exposed("the admin API", "127.0.0.1", guarded=False, flag="--x")  # loopback: fine
    refuse_exposed("the admin API", "0.0.0.0", guarded=True, flag="--x")  # TLS and a token: fine
    with pytest.raises(ValueError, match=r"refusing to serve the admin API on 0\.0\.0\.0 without authentication"):
        refuse_exposed("the admin API", "0.0.0.0", guarded=False, flag="--x")


@pytest.mark.parametrize("flag", ["--admin=0.0.0.0:{port}", "--xds=0.0.0.0:{port}", "--metrics-addr=10.9.9.9:{port}"])
def test_the_control_plane_refuses_a_non_loopback_bind_without_tls_and_a_token(
    flag: str, consul_agent: object, tmp_path: Path
) -> None:
    port = processes.free_port()
    argv = [
        sys.executable,
        "-m",
        "controlplane.cli",
        "controlplane",
        flag.format(port=port),
        f"--consul={consul_agent.addr}",
        f"--metrics-port={processes.free_port()}",
    ]  # type: ignore[attr-defined]
    argv += [] if "--xds" in flag else [f"--xds=127.0.0.1:{processes.free_port()}"]
    argv += [] if "--admin" in flag else [f"--admin=127.0.0.1:{processes.free_port()}"]
    proc = processes.ManagedProcess("controlplane", argv, tmp_path / "cp.log", env={"MLLAMBDA_TOKEN": "t0ken"}).start()
    assert proc.popen is not None
    assert proc.popen.wait(timeout=30) != 0
    assert "refusing to serve" in proc.tail() and "without authentication" in proc.tail()
    with pytest.raises(OSError):  # it never listened
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_children_do_not_inherit_the_admin_or_consul_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLLAMBDA_TOKEN", "admin-secret")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "consul-secret")
    code = "import os; print(os.environ.get('MLLAMBDA_TOKEN'), os.environ.get('CONSUL_HTTP_TOKEN'))"
    show = [sys.executable, "-c", code]
    child = processes.ManagedProcess("child", show, tmp_path / "child.log").start()
    assert child.popen is not None and child.popen.wait(timeout=10) == 0
    assert child.tail() == "None None"
    trusted = processes.ManagedProcess("cp", show, tmp_path / "cp.log", keep_secrets=True).start()
    assert trusted.popen is not None and trusted.popen.wait(timeout=10) == 0
    assert trusted.tail() == "admin-secret consul-secret"


def test_the_admin_api_over_tls_serves_beyond_loopback_with_a_token_and_the_cli_follows(
    consul_agent: object, tmp_path: Path
) -> None:
    key, cert = tmp_path / "admin.key", tmp_path / "admin.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    port = processes.free_port()
    argv = [
        sys.executable,
        "-m",
        "controlplane.cli",
        "controlplane",
        f"--admin=0.0.0.0:{port}",
        f"--xds=127.0.0.1:{processes.free_port()}",
        f"--consul={consul_agent.addr}",  # type: ignore[attr-defined]
        f"--metrics-port={processes.free_port()}",
        f"--kv-prefix=tls-{port}/",
        f"--admin-tls-cert={cert}",
        f"--admin-tls-key={key}",
    ]
    plane = processes.ManagedProcess("controlplane", argv, tmp_path / "cp.log", env={"MLLAMBDA_TOKEN": "t0ken"})
    plane.start()
    try:
        plane.wait_ready(processes.tcp_ready(port), timeout=30)
        base = {**os.environ, "MLLAMBDA_ADMIN_ADDR": f"localhost:{port}", "MLLAMBDA_TOKEN": "t0ken"}

        def cli(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "controlplane.cli", "get", "pipelines"],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )

        assert cli({**base, "MLLAMBDA_ADMIN_CA": str(cert)}).returncode == 0
        plain = cli(base)  # a plaintext client cannot talk to a TLS port
        assert plain.returncode == 1 and "Traceback" not in plain.stderr
        no_token = cli({**base, "MLLAMBDA_ADMIN_CA": str(cert), "MLLAMBDA_TOKEN": ""})
        assert no_token.returncode == 1 and "MLLAMBDA_TOKEN" in no_token.stderr
    finally:
        plane.stop()


@pytest.mark.parametrize(
    ("address", "said"),
    [("10.9.8.7", "refusing to open the sidecar's ingress beyond loopback"), ("db.internal", "an IP address")],
)
def test_a_runtime_is_not_advertised_beyond_loopback_without_mtls(address: str, said: str) -> None:
    argv = [
        sys.executable,
        "-m",
        "controlplane.cli",
        "runtime",
        "examples.trivial.models:echo",
        "--model=echo",
        "--version=v1",
        f"--advertise-address={address}",
        "--consul=127.0.0.1:1",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and said in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


async def test_a_runtime_advertised_on_another_address_is_reached_there_and_only_there(
    control_plane: Any, consul_agent: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    """127.0.0.2 stands for a host's own address: the sidecar's ingress listens there, Consul and EDS carry it."""
    runtime = start_runtime("examples.trivial.models:echo", "echo", "v1", extra=("--advertise-address=127.0.0.2",))
    status, body = processes.http_get(f"http://127.0.0.1:{consul_agent.http_port}/v1/catalog/service/echo")
    entry = next(e for e in json.loads(body) if e["ServiceID"] == runtime.service_id)
    assert status == 200 and entry["ServiceAddress"] == "127.0.0.2"
    ingress = int(entry["ServiceMeta"]["ingress_port"])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", ingress), timeout=1).close()
    spec = {
        "name": "far",
        "transport": "http",
        "stages": [{"name": "echo", "variants": [{"model": "echo", "version": "v1"}]}],
    }
    apply(control_plane, tmp_path, spec)
    code, answer, served = await until_ok(f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/far", {"x": 1})
    assert code == 200 and answer == {"x": 1} and served == "echo=echo:v1"


def test_the_dashboard_listens_on_the_address_given_and_answers_for_it(consul_agent: Any, tmp_path: Path) -> None:
    """127.0.0.2 stands for a host's own address (a loopback one, so no --insecure-expose is needed here)."""
    port = processes.free_port()
    argv = [
        sys.executable,
        "-m",
        "controlplane.cli",
        "controlplane",
        f"--xds=127.0.0.1:{processes.free_port()}",
        f"--admin=127.0.0.1:{processes.free_port()}",
        f"--consul={consul_agent.addr}",
        f"--metrics-addr=127.0.0.2:{port}",
        f"--kv-prefix=exposure-{port}/",
    ]
    proc = processes.ManagedProcess("controlplane", argv, tmp_path / "cp.log").start()
    try:
        proc.wait_ready(lambda: processes.http_get(f"http://127.0.0.2:{port}/metrics")[0] == 200, timeout=30)
        with pytest.raises(OSError):  # not on 127.0.0.1
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        catalog = f"http://127.0.0.1:{consul_agent.http_port}/v1/catalog/service/mllambda-control-plane"

        def registered_at_the_address_given() -> bool:  # it registers once it serves: a moment after /metrics
            found = json.loads(processes.http_get(catalog)[1])
            return any(e["ServiceAddress"] == "127.0.0.2" and e["ServicePort"] == port for e in found)

        proc.wait_ready(registered_at_the_address_given, timeout=30)
        forged = urllib.request.Request(f"http://127.0.0.2:{port}/metrics", headers={"Host": "evil.example"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(forged, timeout=5)
        assert refused.value.code == 421
    finally:
        proc.stop()


def test_a_second_control_plane_on_an_admin_port_in_use_refuses_to_start(control_plane: Any) -> None:
    """Not a silent share of the port (gRPC's SO_REUSEPORT), which split admin calls between the two."""
    argv = [
        sys.executable,
        "-m",
        "controlplane.cli",
        "controlplane",
        f"--xds=127.0.0.1:{processes.free_port()}",
        f"--admin={control_plane.admin_addr}",
        f"--consul=127.0.0.1:{control_plane.consul_port}",
        f"--metrics-addr=127.0.0.1:{processes.free_port()}",
        "--kv-prefix=second-on-a-taken-port/",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "cannot listen for the admin API" in done.stderr, done.stderr[-800:]
    assert control_plane.cli("get", "pipelines").returncode == 0  # the first one serves on
