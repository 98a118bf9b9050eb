"""Consul goes away while traffic flows: nothing fails; when it is back, discovery resumes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ConsulAgent, start_consul
from tests.envoy_helpers import wait_for
from tests.test_discovery_e2e import ONE_STAGE, TOKENIZE, SteadyLoad, gateway_hosts
from tests.test_pipeline_e2e import apply, until_ok

pytestmark = pytest.mark.slow


@pytest.fixture
def consul_agent(logs_dir: Path, tmp_path: Path) -> Iterator[ConsulAgent]:
    """This module's own Consul: a one-node server whose data survives a restart."""
    agent = start_consul(logs_dir, tmp_path / "consul-data", persistent=True)
    yield agent
    agent.proc.stop()


async def test_consul_outage_fails_nothing_and_discovery_resumes(
    control_plane: Any,
    consul_agent: ConsulAgent,
    gateway: Any,
    start_runtime: Any,
    tmp_path: Path,
    logs_dir: Path,
    request: pytest.FixtureRequest,
) -> None:
    start_runtime(TOKENIZE, "tokenize", "v1")
    apply(control_plane, tmp_path, ONE_STAGE)
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/one"
    await until_ok(url, {"text": "a b"})
    before = gateway_hosts(gateway, "tokenize.v1")

    async with SteadyLoad(url) as load:
        await asyncio.sleep(0.3)
        consul_agent.proc.stop()
        await asyncio.sleep(3.0)  # control plane cannot reach Consul meanwhile
        assert gateway_hosts(gateway, "tokenize.v1") == before
        unavailable = await asyncio.to_thread(control_plane.cli, "get", "pipelines")
        assert unavailable.returncode == 1 and "Consul unreachable" in unavailable.stderr, unavailable.stderr
        # Same ports, same data dir: the operator starts Consul again.
        again = await asyncio.to_thread(start_consul, logs_dir, tmp_path / "consul-data", consul_agent.ports, True)
        request.addfinalizer(again.proc.stop)
        await asyncio.sleep(1.0)
    assert set(load.outcomes) == {200}, load.outcomes

    # Discovery picked up by itself: a new replica shows up in the gateway's endpoints.
    start_runtime(TOKENIZE, "tokenize", "v1")
    await wait_for(lambda: len(gateway_hosts(gateway, "tokenize.v1")) == 2, timeout=30)
    await until_ok(url, {"text": "a b"})
