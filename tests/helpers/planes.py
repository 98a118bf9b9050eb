"""A second control plane beside the fixture's, on its own ports (the HA tests)."""

from __future__ import annotations

from pathlib import Path

from controlplane.node import processes
from tests.helpers.components import ControlPlaneProc


def second_control_plane(first: ControlPlaneProc, logs_dir: Path) -> ControlPlaneProc:
    """Another control plane of the same deployment: same Consul, KV prefix, gateway and broker."""
    return ControlPlaneProc(
        processes.free_port(),
        processes.free_port(),
        first.consul_port,
        first.kv_prefix,
        logs_dir / f"controlplane-second-{first.xds_port}.log",
        first.gateway_port,
        first.gateway_admin_port,
        env=dict(first.env),
    )
