"""The install is complete and configuration follows the consul CLI's conventions."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from controlplane.config import ConsulAddress
from controlplane.node import processes


def test_doctor_lists_the_real_components() -> None:
    result = subprocess.run([sys.executable, "-m", "controlplane.cli", "doctor"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert re.search(r"ok\s+envoy\s+1\.40\.\d+", result.stdout)
    assert re.search(r"ok\s+consul\s+1\.8\.\d+", result.stdout)
    assert re.search(r"ok\s+tansu\s+\S+", result.stdout)


def test_consul_address_flag_beats_environment_beats_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    assert ConsulAddress.from_settings().url == "http://127.0.0.1:8500"
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "https://consul.internal:8501")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "secret")
    env = ConsulAddress.from_settings()
    assert (env.url, env.token) == ("https://consul.internal:8501", "secret")
    assert ConsulAddress.from_settings("10.1.2.3:9500").url == "http://10.1.2.3:9500"


def test_bad_consul_address_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="port must be a number"):
        ConsulAddress.from_settings("127.0.0.1:http")


def test_free_ports_never_repeat_within_a_process() -> None:
    """Components started together (Consul's DNS and Serf ports, a runtime and its sidecar) never share a port."""
    ports = [processes.free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)


def test_free_ports_never_repeat_across_processes() -> None:
    """A runtime process picking its sidecar's ports never gets one the test process just took."""
    code = "from controlplane.node import processes; print(*(processes.free_port() for _ in range(300)))"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    mine = {processes.free_port() for _ in range(300)}
    out, _ = child.communicate(timeout=60)
    theirs = {int(p) for p in out.split()}
    assert len(theirs) == 300 and not mine & theirs


def test_a_port_whose_last_connections_linger_in_time_wait_counts_as_free() -> None:
    """`mllambda down` then `up`: Consul's old connections sit in TIME_WAIT, but nothing listens."""
    import socket
    import time

    from controlplane.node import processes

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Consul (Go) and Envoy listen
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    assert not processes.port_is_free(port)  # listening: taken
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end goes to TIME_WAIT
    client.close()
    server.close()
    time.sleep(0.1)  # the FIN exchange completes: TIME_WAIT
    plain = socket.socket()
    try:
        plain.bind(("127.0.0.1", port))  # what the old check did
        lingering = False
    except OSError:
        lingering = True
    finally:
        plain.close()
    assert lingering, "no TIME_WAIT was made: the test proves nothing"
    assert processes.port_is_free(port)


def test_control_planes_given_by_name_are_found_through_dns() -> None:
    """Envoy's STATIC clusters take IP addresses only: `--xds cp.example:18000` needs a DNS cluster."""
    from controlplane.node.sidecar import render_bootstrap

    def xds_cluster(addresses: str) -> dict[str, object]:
        config = yaml.safe_load(render_bootstrap("gateway", "gateway", addresses, 19000))
        return next(c for c in config["static_resources"]["clusters"] if c["name"] == "mllambda_xds")

    assert xds_cluster("127.0.0.1:18000,10.0.0.2:18000")["type"] == "STATIC"
    named = xds_cluster("127.0.0.1:18000,mllambda-xds.mllambda.svc:18000")
    assert named["type"] == "STRICT_DNS" and named["dns_lookup_family"] == "V4_PREFERRED"
