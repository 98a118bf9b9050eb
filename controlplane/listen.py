"""Binding the control plane's gRPC servers to their listen addresses (every address is a flag)."""

from __future__ import annotations

import grpc

GRPC_OPTIONS = [
    ("grpc.max_concurrent_streams", 100_000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.so_reuseport", 0),
]


def bind_grpc(server: grpc.aio.Server, address: str, what: str) -> int:
    """Listen on `address`; an OSError names what could not listen where (a port in use, say)."""
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as err:
        raise OSError(f"cannot listen for {what} on {address}: {err}") from err
    if port == 0:
        raise OSError(f"cannot listen for {what} on {address}: address in use?")
    return int(port)
