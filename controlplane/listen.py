"""Binding the control plane's gRPC servers to their listen addresses (every address is a flag)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc

from controlplane.config import split_host_port

GRPC_OPTIONS = [
    ("grpc.max_concurrent_streams", 100_000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.so_reuseport", 0),
]


def bind_grpc(
    server: grpc.aio.Server, address: str, what: str, credentials: grpc.ServerCredentials | None = None
) -> int:
    """Listen on `address` (TLS with `credentials`); an OSError names what could not listen where."""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as err:
        raise OSError(f"cannot listen for {what} on {address}: {err}") from err
    if port == 0:
        raise OSError(f"cannot listen for {what} on {address}: address in use?")
    return int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def loopback_if_any(host: str) -> str:
    """Where this host reaches its own listener bound to `host`: loopback for a wildcard address."""
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, host)


def refuse_exposed(what: str, host: str, guarded: bool, flag: str) -> None:
    """Nothing beyond loopback without authentication: a ValueError says what to configure."""
    if not guarded and not is_loopback(host):
        raise ValueError(
            f"refusing to serve {what} on {host} without authentication: configure it "
            f"(see docs/architecture.md, threat model) or pass {flag} if the network is yours alone"
        )


def metrics_address(addr: str, exposed: bool) -> tuple[str, int]:
    """Where the dashboard and /metrics listen: an IP address (it is registered in Consul for Prometheus),
    beyond loopback only when told the network is ours alone (reads there need no credential)."""
    host, port = split_host_port(addr, 18002)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as err:
        raise ValueError(f"--metrics-addr: an IP address of this host and a port, got {addr!r}") from err
    if ip.is_unspecified:
        raise ValueError(f"--metrics-addr: this host's own address, not {host} (it is registered in Consul)")
    refuse_exposed("the dashboard and /metrics", host, exposed, "--insecure-expose")
    return host, port


def admin_credentials(cert: str, key: str, client_ca: str) -> grpc.ServerCredentials | None:
    """TLS for the admin API from PEM files; with `client_ca`, clients need a certificate it signed (mTLS)."""
    if not cert:
        return None
    pairs = [(Path(key).read_bytes(), Path(cert).read_bytes())]
    roots = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials(pairs, root_certificates=roots, require_client_auth=bool(client_ca))
