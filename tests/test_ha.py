"""Two control planes: Envoys fail over from one to the other without losing a request or their config."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from controlplane import processes
from controlplane.sidecar import render_bootstrap
from tests.conftest import ControlPlaneProc
from tests.envoy_helpers import envoy_stat
from tests.test_discovery_e2e import ONE_STAGE, TOKENIZE, SteadyLoad
from tests.test_pipeline_e2e import apply, until_ok

pytestmark = pytest.mark.slow


async def test_envoys_fail_over_to_a_second_control_plane(
    control_plane: Any, start_envoy: Any, start_runtime: Any, logs_dir: Path, tmp_path: Path
) -> None:
    second = ControlPlaneProc(
        processes.free_port(), processes.free_port(), control_plane.consul_port, control_plane.kv_prefix,
        logs_dir / "controlplane-second.log", control_plane.gateway_port, control_plane.gateway_admin_port,
    )  # fmt: skip
    both = f"{control_plane.xds_addr},{second.xds_addr}"  # the second is not up yet: Envoys use the first
    gateway = start_envoy(
        lambda admin: render_bootstrap("gateway", "gateway", both, admin), admin_port=control_plane.gateway_admin_port
    )
    start_runtime(TOKENIZE, "tokenize", "v1", xds=both)
    apply(control_plane, tmp_path, ONE_STAGE)
    base = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines"
    await until_ok(f"{base}/one", {"text": "a b"})
    second.start()
    try:
        listeners_changed = envoy_stat(gateway, "listener_manager.listener_modified")
        async with SteadyLoad(f"{base}/one") as load:
            control_plane.stop()
            # Only the second control plane is left: a new pipeline applied there must reach the Envoys.
            apply(second, tmp_path, {**ONE_STAGE, "name": "two"})
            await until_ok(f"{base}/two", {"text": "a b"}, timeout=60)
            await asyncio.sleep(1)
        assert set(load.outcomes) == {200}, load.outcomes
        assert load.outcomes[200] > 50
        # Both serve identical, content-versioned snapshots: switching servers re-created no listener.
        assert envoy_stat(gateway, "listener_manager.listener_modified") == listeners_changed
        assert envoy_stat(gateway, "control_plane.connected_state") == 1
    finally:
        second.stop()
