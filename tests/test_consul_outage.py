"""Consul goes away while traffic flows: nothing fails; when it is back, discovery resumes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import consul
import pytest

from tests.helpers.components import ConsulAgent, start_consul
from tests.helpers.envoy import wait_for
from tests.helpers.load import ONE_STAGE, TOKENIZE, SteadyLoad, gateway_hosts
from tests.helpers.observe import metric, scrape
from tests.helpers.pipelines import apply, until_ok

pytestmark = pytest.mark.slow


@pytest.fixture
def consul_agent(logs_dir: Path, tmp_path: Path) -> Iterator[ConsulAgent]:
    """This module's own Consul: a one-node server whose data survives a restart."""
    agent = start_consul(logs_dir, tmp_path / "consul-data", persistent=True)
    yield agent
    agent.proc.stop()


async def serving_one(control_plane: Any, start_runtime: Any, tmp_path: Path) -> str:
    """One runtime, pipeline `one` on it, answering through the gateway; its URL."""
    start_runtime(TOKENIZE, "tokenize", "v1")
    apply(control_plane, tmp_path, ONE_STAGE)
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/one"
    await until_ok(url, {"text": "a b"})
    return url


async def status_of(url: str, wanted: int) -> bool:
    async with aiohttp.ClientSession() as http, http.post(url, json={"text": "a b"}) as resp:
        return resp.status == wanted


async def test_consul_outage_fails_nothing_and_discovery_resumes(
    control_plane: Any,
    consul_agent: ConsulAgent,
    gateway: Any,
    start_runtime: Any,
    tmp_path: Path,
    logs_dir: Path,
    request: pytest.FixtureRequest,
) -> None:
    url = await serving_one(control_plane, start_runtime, tmp_path)
    before = gateway_hosts(gateway, "tokenize.v1")

    async with SteadyLoad(url) as load:
        await load.more()
        consul_agent.proc.stop()
        await asyncio.sleep(3.0)  # control plane cannot reach Consul meanwhile
        assert gateway_hosts(gateway, "tokenize.v1") == before
        unavailable = await asyncio.to_thread(control_plane.cli, "get", "pipelines")
        assert unavailable.returncode == 1 and "Consul unreachable" in unavailable.stderr, unavailable.stderr
        # Same ports, same data dir: the operator starts Consul again.
        again = await asyncio.to_thread(start_consul, logs_dir, tmp_path / "consul-data", consul_agent.ports, True)
        request.addfinalizer(again.proc.stop)
        await load.more(50)
    assert set(load.outcomes) == {200}, load.outcomes

    # Discovery picked up by itself: a new replica shows up in the gateway's endpoints.
    start_runtime(TOKENIZE, "tokenize", "v1")
    await wait_for(lambda: len(gateway_hosts(gateway, "tokenize.v1")) == 2, timeout=30)
    await until_ok(url, {"text": "a b"})


async def test_a_control_plane_started_while_consul_is_down_empties_no_envoy(
    control_plane: Any,
    consul_agent: ConsulAgent,
    gateway: Any,
    start_runtime: Any,
    tmp_path: Path,
    logs_dir: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Cold start: the gateway reconnects to a control plane that has read nothing yet and keeps its config."""
    url = await serving_one(control_plane, start_runtime, tmp_path)

    async with SteadyLoad(url) as load:
        control_plane.stop()
        consul_agent.proc.stop()
        await asyncio.to_thread(control_plane.start)  # Consul is down: it cannot read catalog or KV
        await wait_for(lambda: metric(scrape(control_plane), "mllambda_xds_connected_streams") >= 2, timeout=30)
        await asyncio.sleep(2.0)  # the gateway and the sidecar are connected; before the fix they got empty configs
        again = await asyncio.to_thread(start_consul, logs_dir, tmp_path / "consul-data", consul_agent.ports, True)
        request.addfinalizer(again.proc.stop)
        await wait_for(lambda: metric(scrape(control_plane), "mllambda_consul_reachable") == 1, timeout=30)
        await load.more(50)
    assert set(load.outcomes) == {200}, load.outcomes
    assert sum(load.outcomes.values()) > 50

    apply(control_plane, tmp_path, {**ONE_STAGE, "stages": [{**ONE_STAGE["stages"][0], "timeout_ms": 4000}]})
    await until_ok(url, {"text": "a b"})  # and it deploys again once Consul is back


async def test_every_runtime_vanishing_at_once_is_held_for_the_grace_then_believed(
    control_plane: Any, consul_agent: ConsulAgent, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    """An agent that forgot its services (restart, wiped state) empties no gateway; a real drop goes through."""
    control_plane.stop()
    control_plane.extra_args = ["--empty-grace=8"]
    control_plane.start()
    runtime = start_runtime(TOKENIZE, "tokenize", "v1")
    apply(control_plane, tmp_path, ONE_STAGE)
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/one"
    await until_ok(url, {"text": "a b"})
    agent = consul.Consul(port=consul_agent.http_port).agent

    async with SteadyLoad(url) as load:
        agent.service.deregister(runtime.service_id)  # what an agent restart looks like to discovery
        await wait_for(lambda: metric(scrape(control_plane), "mllambda_discovery_held_drops_total") == 1, timeout=10)
        # the runtime registers itself again within 2 s (anti-entropy); the hold ends
        await wait_for(lambda: metric(scrape(control_plane), "mllambda_discovery_holding") == 0, timeout=10)
        await load.more()
    assert set(load.outcomes) == {200}, load.outcomes

    # Every pipeline vanishing from KV at once (a dev agent restarted empty, a wiped KV) is held the same way: no
    # request fails while the keys are away, and when they are written back (the stack's supervisor does) it ends.
    kv = consul.Consul(port=consul_agent.http_port).kv
    _, saved = kv.get(control_plane.kv_prefix, recurse=True)
    async with SteadyLoad(url) as load:
        kv.delete(control_plane.kv_prefix, recurse=True)
        await wait_for(lambda: metric(scrape(control_plane), "mllambda_pipelines_holding") == 1, timeout=10)
        await load.more(50)  # served while the keys are away
        for item in saved:
            kv.put(item["Key"], item["Value"])
        await wait_for(lambda: metric(scrape(control_plane), "mllambda_pipelines_holding") == 0, timeout=10)
        await load.more()
    assert set(load.outcomes) == {200}, load.outcomes
    kv.delete(control_plane.kv_prefix, recurse=True)  # and a wipe that lasts is believed after the grace
    await wait_for(lambda: metric(scrape(control_plane), "mllambda_pipelines_holding") == 1, timeout=10)
    assert await status_of(url, 200)
    await wait_for(lambda: metric(scrape(control_plane), "mllambda_pipelines_holding") == 0, timeout=20)
    await wait_for(lambda: status_of(url, 404), timeout=20)  # the gateway routes it no more
    for item in saved:
        kv.put(item["Key"], item["Value"])
    await until_ok(url, {"text": "a b"})

    # A drop that lasts is believed after the grace: the endpoint leaves the gateway.
    before = gateway_hosts(gateway, "tokenize.v1")
    runtime.proc.stop()  # deregisters, drains 1.5 s, exits: well inside the 8-s grace
    assert gateway_hosts(gateway, "tokenize.v1") == before  # held
    assert metric(scrape(control_plane), "mllambda_discovery_holding") == 1
    await wait_for(lambda: not gateway_hosts(gateway, "tokenize.v1"), timeout=20)
    assert metric(scrape(control_plane), "mllambda_discovery_holding") == 0


async def test_a_replacement_started_while_the_last_runtime_is_held_serves_without_waiting_out_the_grace(
    control_plane: Any, consul_agent: ConsulAgent, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    """A single-replica version replaced (a deploy, a restart): the hold must not keep the new one out."""
    control_plane.stop()
    control_plane.extra_args = ["--empty-grace=120"]
    control_plane.start()
    first = start_runtime(TOKENIZE, "tokenize", "v1")
    apply(control_plane, tmp_path, ONE_STAGE)
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/one"
    await until_ok(url, {"text": "a b"})
    first.proc.stop()  # the only runtime leaves: held for 120 s
    assert metric(scrape(control_plane), "mllambda_discovery_holding") == 1
    started = time.monotonic()
    second = start_runtime(TOKENIZE, "tokenize", "v1")  # waits (30 s at most) until Consul says passing
    await until_ok(url, {"text": "a b"})
    assert time.monotonic() - started < 30  # it was 120 s (the grace) before newcomers joined the held set
    assert metric(scrape(control_plane), "mllambda_discovery_holding") == 0
    await wait_for(lambda: len(gateway_hosts(gateway, "tokenize.v1")) == 1, timeout=10)  # the held one gone
    assert second.proc.alive()
