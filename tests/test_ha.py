"""Two control planes: Envoys fail over from one to the other without losing a request or their config."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import consul.aio
import pytest
from aiohttp import test_utils

from contract import headers as h
from controlplane.kafka.bridge import build_bridge_app
from controlplane.kafka.plane import KafkaPlane
from controlplane.node import processes
from controlplane.node.sidecar import render_bootstrap
from controlplane.pipeline.spec import parse_pipeline
from tests.helpers.components import ControlPlaneProc
from tests.helpers.envoy import envoy_stat, get_json, wait_for
from tests.helpers.load import ONE_STAGE, TOKENIZE, SteadyLoad, gateway_hosts
from tests.helpers.pipelines import apply, in_traffic, until_ok
from tests.helpers.planes import second_control_plane

pytestmark = pytest.mark.slow


async def test_envoys_fail_over_to_a_second_control_plane(
    control_plane: Any, start_envoy: Any, start_runtime: Any, logs_dir: Path, tmp_path: Path
) -> None:
    second = second_control_plane(control_plane, logs_dir)
    # The second is given by name (as a Kubernetes Service would be) and is not up yet: Envoys use the first.
    both = f"{control_plane.xds_addr},localhost:{second.xds_port}"
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
            await load.more(50)
        assert set(load.outcomes) == {200}, load.outcomes
        assert load.outcomes[200] > 50
        # Both serve identical, content-versioned snapshots: switching servers re-created no listener.
        assert envoy_stat(gateway, "listener_manager.listener_modified") == listeners_changed
        assert envoy_stat(gateway, "control_plane.connected_state") == 1
    finally:
        second.stop()


def bridges_of(plane: ControlPlaneProc) -> list[str]:
    """The Kafka bridges a control plane routes to, as its /api/status shows them."""
    _, body = processes.http_get(f"http://127.0.0.1:{plane.metrics_port}/api/status")
    return list(json.loads(body)["kafka_bridges"])


async def test_kafka_bridge_survives_losing_a_control_plane(
    kafka_plane: Any, start_envoy: Any, start_runtime: Any, logs_dir: Path, tmp_path: Path
) -> None:
    """Each control plane serves the HTTP bridge of Kafka pipelines; the gateway uses them all."""
    control_plane = kafka_plane
    second = second_control_plane(control_plane, logs_dir)
    both = f"{control_plane.xds_addr},{second.xds_addr}"
    gateway = start_envoy(
        lambda admin: render_bootstrap("gateway", "gateway", both, admin), admin_port=control_plane.gateway_admin_port
    )
    start_runtime(TOKENIZE, "tokenize", "v1", xds=both)
    apply(control_plane, tmp_path, {**ONE_STAGE, "transport": "kafka"})
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/one"
    await until_ok(url, {"text": "a b"}, timeout=60)
    assert len(gateway_hosts(gateway, "mll-kafka-bridge")) == 1
    second.start()
    try:
        await wait_for(lambda: len(gateway_hosts(gateway, "mll-kafka-bridge")) == 2, timeout=30)
        assert len(bridges_of(second)) == 2
        async with SteadyLoad(url) as load:
            await load.more(60)  # both bridges busy
            assert control_plane.proc is not None
            control_plane.proc.signal(signal.SIGKILL)
            answered_before = sum(load.outcomes.values())
            # Consul's check fails, the surviving control plane drops the dead bridge.
            await wait_for(lambda: len(gateway_hosts(gateway, "mll-kafka-bridge")) == 1, timeout=30)
            await load.more(50)  # served by the bridge left
        _, stats = gateway.admin("/stats?filter=mll-kafka-bridge.upstream_(rq_retry|cx_connect_fail)")
        assert set(load.outcomes) == {200}, (load.outcomes, load.failures, stats)
        assert bridges_of(second) == [f"127.0.0.1:{second.bridge_port}"]
        status = second.cli("status", f"--dashboard=http://127.0.0.1:{second.metrics_port}")
        assert f"kafka bridges: 127.0.0.1:{second.bridge_port}\n" in status.stdout, status.stdout + status.stderr
        assert sum(load.outcomes.values()) - answered_before > 20, load.outcomes
    finally:
        second.stop()


def echoes(stages: int) -> dict[str, Any]:
    echo = {"variants": [{"model": "echo", "version": "v1"}]}
    return {"name": "one", "stages": [{"name": f"echo{n}", **echo} for n in range(stages)]}


async def test_a_new_version_waits_for_a_sidecar_that_streams_to_another_control_plane(
    control_plane: Any, start_envoy: Any, start_runtime: Any, logs_dir: Path, tmp_path: Path
) -> None:
    """The gateway streams to one control plane, the runtime's sidecar to the other, which freezes (as a
    host cut off would look: its streams open, nothing answered). A version applied through the first must
    not take traffic while that sidecar lacks its hops (its ingress would refuse them: 403), and must once
    it has them."""
    second = second_control_plane(control_plane, logs_dir).start()
    try:
        start_envoy(
            lambda admin: render_bootstrap("gateway", "gateway", second.xds_addr, admin),
            admin_port=control_plane.gateway_admin_port,
        )
        start_runtime("examples.trivial.models:echo", "echo", "v1", xds=control_plane.xds_addr)
        apply(second, tmp_path, echoes(1))
        url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/one"
        await until_ok(url, {"text": "a b"})
        await in_traffic(second, "one", 1)
        _, status = await get_json(f"http://127.0.0.1:{second.metrics_port}/api/status")
        (first_record,) = status["control_planes"]["others"].values()  # what the second knows of the first
        assert first_record["sidecars"] == 1 and ["one", 1] in first_record["ready"], status["control_planes"]
        assert control_plane.proc is not None
        control_plane.proc.signal(signal.SIGSTOP)
        try:
            async with SteadyLoad(url) as load:
                apply(second, tmp_path, echoes(2))  # version 2: a hop out of that sidecar it has no route for yet
                await asyncio.sleep(5)  # an observation window: version 2 must not go in meanwhile
                described = second.cli("describe", "pipeline", "one")
            assert set(load.outcomes) == {200}, load.outcomes
            assert "version 2 is not in traffic yet" in described.stdout, described.stdout
            # The frozen control plane is still known (its presence not lapsed yet) or no longer: the sidecar's
            # wait is named either way, and version 1 serves meanwhile.
            waiting = ("streams to control plane", "streams to no control plane")
            assert any(w in described.stdout for w in waiting) and "version 1 serves" in described.stdout
        finally:
            control_plane.proc.signal(signal.SIGCONT)
        async with SteadyLoad(url) as load:
            await in_traffic(second, "one", 2, timeout=30)  # the first pushed it, the sidecar has it, it went in
            await load.more()
        assert set(load.outcomes) == {200}, load.outcomes
    finally:
        second.stop()


async def test_a_bridge_that_cannot_produce_yet_says_503_retriable_so_the_gateway_tries_another() -> None:
    """The bridge before its broker connection: a 503 with the header the gateway retries on, nothing produced."""
    pipeline = parse_pipeline({**ONE_STAGE, "transport": "kafka"})
    kafka = KafkaPlane(f"127.0.0.1:{processes.free_port()}", consul.aio.Consul(), "mll", "mll-replies-test")
    app = build_bridge_app(kafka, lambda name: pipeline if name == "one" else None)
    async with test_utils.TestClient(test_utils.TestServer(app)) as client:
        answer = await client.post("/bridge/one", data=b'{"text": "a b"}')
        assert answer.status == 503 and answer.headers.get(h.RETRIABLE) == "true"
        assert "Kafka broker not reachable" in (await answer.json())["error"]
        unknown = await client.post("/bridge/two", data=b'{"text": "a b"}')
        assert unknown.status == 404 and h.RETRIABLE not in unknown.headers


async def test_a_stopped_control_plane_says_what_stopped_it_and_how_long_its_stop_took(
    control_plane: ControlPlaneProc,
) -> None:
    """A control plane that stops without being asked must be tellable from one that was stopped (the CI once
    saw an alive one refuse its admin port): the log names the signal and the stop's length."""
    assert control_plane.proc is not None
    await wait_for(lambda: "ready pid=" in control_plane.proc.tail(10), timeout=30)  # type: ignore[union-attr]
    control_plane.stop()
    tail = control_plane.proc.tail(5)
    assert "stopping (SIGTERM)" in tail and "stopped after" in tail, tail
    assert control_plane.last_stop.endswith("exit 0"), control_plane.last_stop
