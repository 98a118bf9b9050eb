"""Runtimes register in Consul; discovery turns them into endpoints that reach every Envoy."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.node.processes import http_get
from tests.helpers.envoy import wait_for
from tests.helpers.load import ONE_STAGE, TOKENIZE, SteadyLoad, gateway_hosts
from tests.helpers.pipelines import M, apply, post, runtime_requests, service_meta, until_ok

pytestmark = pytest.mark.slow


def consul_status(consul_port: int, service: str, service_id: str) -> str:
    _, body = http_get(f"http://127.0.0.1:{consul_port}/v1/health/checks/{service}")
    statuses = [c["Status"] for c in json.loads(body) if c["ServiceID"] == service_id]
    return statuses[0] if statuses else "gone"


async def test_replicas_are_found_and_sigterm_drains_without_errors(
    control_plane: Any, consul_agent: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    started = time.monotonic()
    first = start_runtime(TOKENIZE, "tokenize", "v1", wait=False)
    await wait_for(lambda: consul_status(consul_agent.http_port, "tokenize", first.service_id) != "gone")
    registered_after = time.monotonic() - started
    print(f"runtime process start -> registered in Consul: {registered_after:.2f}s")
    # A runtime registers as it starts, not after some later event: ~1-2 s here. The bound is for that, not for the
    # machine's speed: 3 s failed a clean-clone CI at 3.32 s with the other worker busy (session 27).
    assert registered_after < 10.0

    apply(control_plane, tmp_path, ONE_STAGE)
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/one"
    await until_ok(url, {"text": "a b"})
    assert len(gateway_hosts(gateway, "tokenize.v1")) == 1

    second = start_runtime(TOKENIZE, "tokenize", "v1")
    await wait_for(lambda: len(gateway_hosts(gateway, "tokenize.v1")) == 2)
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(post(session, url, {"text": "a b"}) for _ in range(200)))
    for replica in (first, second):
        assert runtime_requests(consul_agent.http_port, "tokenize", replica.service_id) > 30

    async with SteadyLoad(url) as load:
        await load.more(50)
        first.proc.signal(signal.SIGTERM)
        await asyncio.to_thread(first.proc.popen.wait, 20)
        await load.more(60)  # served by the one left
    assert set(load.outcomes) == {200}, load.outcomes
    assert load.outcomes[200] > 100
    assert first.proc.popen.returncode == 0
    await wait_for(lambda: len(gateway_hosts(gateway, "tokenize.v1")) == 1)


async def test_sigkill_turns_critical_and_leaves_eds(
    control_plane: Any, consul_agent: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    doomed = start_runtime(TOKENIZE, "tokenize", "v1")
    start_runtime(TOKENIZE, "tokenize", "v1")
    apply(control_plane, tmp_path, ONE_STAGE)
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/one"
    await until_ok(url, {"text": "a b"})
    await wait_for(lambda: len(gateway_hosts(gateway, "tokenize.v1")) == 2)

    # The burst must meet the dead replica while it is still in EDS. Consul's check runs every second, so
    # instead of racing it, Consul is paused (SIGSTOP) from the kill until the burst is done: the control
    # plane holds the set it has, as it would while Consul has not noticed yet.
    consul_agent.proc.signal(signal.SIGSTOP)
    try:
        doomed.proc.signal(signal.SIGKILL)
        # Every request that meets the dead one retries on the other, dozens at once (Envoy's default cap
        # of 3 concurrent retries per cluster would fail the rest).
        async with aiohttp.ClientSession() as session:
            burst = await asyncio.gather(*(post(session, url, {"text": "a b"}) for _ in range(64)))
        assert len(gateway_hosts(gateway, "tokenize.v1")) == 2, "the burst must run while both are in EDS"
    finally:
        consul_agent.proc.signal(signal.SIGCONT)
    assert {status for status, _, _ in burst} == {200}, [b for b in burst if b[0] != 200][:3]
    await wait_for(lambda: consul_status(consul_agent.http_port, "tokenize", doomed.service_id) == "critical")
    await wait_for(lambda: len(gateway_hosts(gateway, "tokenize.v1")) == 1)
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(post(session, url, {"text": "a b"}) for _ in range(100)))
    assert {status for status, _, _ in results} == {200}


async def test_readiness_answers_in_time_while_predicts_hold_the_event_loop(
    control_plane: Any, start_runtime: Any, consul_agent: Any
) -> None:
    """Consul's check (1 s timeout, through the sidecar) must not flap a busy replica out of the catalog."""
    hog = start_runtime(f"{M}:cpu_hog", "hog", "v1")
    meta = service_meta(consul_agent.http_port, "hog", hog.service_id)
    predict_url = f"http://127.0.0.1:{meta['runtime_port']}/predict"
    ready_url = f"http://127.0.0.1:{meta['ingress_port']}/readyz"  # the path Consul's check takes
    stop = asyncio.Event()

    async def keep_busy(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            async with session.post(predict_url, json={}) as resp:
                assert resp.status == 200

    late: list[float] = []
    async with aiohttp.ClientSession() as session:
        busy = [asyncio.create_task(keep_busy(session)) for _ in range(3)]
        await asyncio.sleep(0.5)  # load duration: the predicts hold the loop before readiness is measured
        statuses = []
        for _ in range(20):
            started = time.perf_counter()
            async with session.get(ready_url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                statuses.append(resp.status)
            late.append(time.perf_counter() - started)
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*busy)
    assert statuses == [200] * 20 and max(late) < 1.0, (statuses, late)
    assert consul_status(consul_agent.http_port, "hog", hog.service_id) == "passing"


def test_a_runtime_registered_again_under_its_id_is_read_again() -> None:
    """A restarted replica keeps its service ID and check ID but not its ports; its check keeps the state the old
    one ended in (critical), and Consul syncs a new output lazily, so only the notes (naming the process) tell the
    two apart (found by tests/test_supervision.py: without them the replacement waited for the resync, ~25 s)."""
    from controlplane.consul.discovery import fingerprints

    check = {"ServiceName": "m", "ServiceID": "m-v1-0", "CheckID": "service:m-v1-0", "Status": "critical"}
    assert fingerprints([{**check, "Notes": "process a"}]) != fingerprints([{**check, "Notes": "process b"}])
    assert fingerprints([{**check, "Notes": "process a"}]) == fingerprints([{**check, "Notes": "process a"}])
