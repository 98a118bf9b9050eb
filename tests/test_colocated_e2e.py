"""Same-host delivery through real Envoys: a sender reaches a runtime on its own host at the runtime's socket,
its sidecar's ingress untouched; the answers, headers and refusals are those of the hop through the ingress."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers.envoy import admin_stat, wait_for
from tests.helpers.pipelines import apply, in_traffic, pipeline, post, service_meta, until_ok

pytestmark = pytest.mark.slow
MODELS = ("count", "score")
FORGED = {"x-mll-shadow": "1", "x-mll-next": "/pipelines/direct/v1/score", "x-mll-stage": "score"}


def ingress_requests(consul_port: int, runtime: Any) -> int:
    """Pipeline requests a runtime's sidecar passed from its ingress to the runtime (Consul's checks go to the
    runtime's readiness port, a cluster of its own)."""
    admin = service_meta(consul_port, runtime.model, runtime.service_id)["envoy_admin_port"]
    return admin_stat(admin, "cluster.local-http.upstream_rq_total")


async def test_a_hop_on_one_host_skips_the_next_sidecar_and_answers_the_same(
    control_plane: Any, consul_agent: Any, gateway: Any, three_stages: list[Any], tmp_path: Path
) -> None:
    apply(control_plane, tmp_path, pipeline("direct"))
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/direct"
    await until_ok(url, {"text": "a b c"})

    async def burst(n: int, headers: dict[str, str] | None = None) -> set[tuple[int, str, str]]:
        async with aiohttp.ClientSession() as session:
            found = set()
            for _ in range(n):
                async with session.post(url, json={"text": "a b c"}, headers=headers or {}) as resp:
                    found.add((resp.status, await resp.text(), resp.headers.get("x-mll-served", "")))
            return found

    served = "tokenize=tokenize:v1, count=count:v1, score=score:v1"
    answer = (200, '{"count":3,"score":30}', served)  # (compact: the runtimes write JSON with orjson)
    before = [ingress_requests(consul_agent.http_port, r) for r in three_stages]
    assert await burst(30) == {answer}
    # Steering headers a client forges are dropped at the gateway (no ingress is left to drop them).
    assert await burst(5, FORGED) == {answer}
    after = [ingress_requests(consul_agent.http_port, r) for r in three_stages]
    assert after == before, "a hop on one host went through the next stage's sidecar"

    # Turned off (`--colocated ingress`): the same answers, now through every ingress.
    control_plane.stop()
    control_plane.env = {**control_plane.env, "MLLAMBDA_COLOCATED": "ingress"}
    control_plane.start()

    async def through_ingress() -> bool:  # every Envoy back on the restarted control plane, in its own time
        counted = [ingress_requests(consul_agent.http_port, r) for r in three_stages]
        await burst(1)
        return all(ingress_requests(consul_agent.http_port, r) > n for r, n in zip(three_stages, counted, strict=True))

    await wait_for(through_ingress, timeout=30)
    before = [ingress_requests(consul_agent.http_port, r) for r in three_stages]
    assert await burst(30) == {answer} and await burst(5, FORGED) == {answer}
    after = [ingress_requests(consul_agent.http_port, r) for r in three_stages]
    assert [a - b for a, b in zip(after, before, strict=True)] == [35, 35, 35]


async def test_a_killed_runtime_on_the_senders_host_is_retried_on_its_other_replica(
    control_plane: Any, consul_agent: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    """The runtime process SIGKILLed, its sidecar left running: still registered, its socket file left behind,
    until Consul's check fails. Senders on its host meet a refused socket and retry the other replica."""
    sender = start_runtime("examples.trivial.models:tokenize", "tokenize", "v1")  # on the gateway's host
    start_runtime("examples.trivial.models:count", "count", "v1")
    doomed = start_runtime("examples.trivial.models:count", "count", "v1")
    start_runtime("examples.trivial.models:score", "score", "v1")
    apply(control_plane, tmp_path, pipeline("killed"))
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/killed"
    await until_ok(url, {"text": "a b"})
    os.kill(doomed.proc.pid, signal.SIGKILL)
    async with aiohttp.ClientSession() as session:
        outcomes = [await post(session, url, {"text": "a b"}) for _ in range(100)]
    assert {(status, str(body)) for status, body, _ in outcomes} == {(200, str({"count": 2, "score": 20}))}
    # The sender is the gateway Envoy, which carries the output of runtimes on its host (Same host, shared).
    assert admin_stat(control_plane.gateway_admin_port, "cluster.count_v1.upstream_rq_retry") > 0, "never tried"
    admin = service_meta(consul_agent.http_port, "tokenize", sender.service_id)["envoy_admin_port"]
    assert admin_stat(admin, "cluster.count_v1.upstream_rq_total") == 0, "the sender's own sidecar carried it"


def carried_by(control_plane: Any, consul_port: int, runtimes: list[Any]) -> list[int]:
    """Requests into count and score sent by the gateway, then by the tokenize and count sidecars."""
    sidecars = [service_meta(consul_port, r.model, r.service_id)["envoy_admin_port"] for r in runtimes[:2]]
    gateway = [admin_stat(control_plane.gateway_admin_port, f"cluster.{c}_v1.upstream_rq_total") for c in MODELS]
    return gateway + [admin_stat(a, f"cluster.{c}_v1.upstream_rq_total") for a, c in zip(sidecars, MODELS, strict=True)]


async def test_the_gateway_carries_each_hop_on_its_host_and_changing_that_under_load_loses_nothing(
    control_plane: Any, consul_agent: Any, gateway: Any, three_stages: list[Any], tmp_path: Path
) -> None:
    """The runtimes' output goes through the gateway Envoy, not their sidecars. The control plane restarted
    with `--colocated direct` takes it off the gateway (listeners drained, clusters gone) and back on, while
    requests flow: each runtime falls back to its own sidecar and returns, and every request is answered."""
    apply(control_plane, tmp_path, pipeline("shared"))
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/shared"
    await until_ok(url, {"text": "a b c"})
    answer = (200, str({"count": 3, "score": 30}))

    def counted() -> list[int]:
        return carried_by(control_plane, consul_agent.http_port, three_stages)

    async def one() -> tuple[int, str]:
        async with aiohttp.ClientSession() as session:
            status, body, _ = await post(session, url, {"text": "a b c"})
            return status, str(body)

    async def moved(to: slice) -> bool:  # a runtime back from its 1 s fallback, in its own time
        before = counted()
        assert await one() == answer
        return all(a > b for a, b in zip(counted()[to], before[to], strict=True))

    await wait_for(lambda: moved(slice(0, 2)), timeout=10)
    before = counted()
    assert {await one() for _ in range(30)} == {answer}
    assert [a - b for a, b in zip(counted(), before, strict=True)] == [30, 30, 0, 0]

    outcomes: list[tuple[int, str]] = []
    done = asyncio.Event()

    async def load() -> None:
        async with aiohttp.ClientSession() as session:
            while not done.is_set():
                status, body, _ = await post(session, url, {"text": "a b c"})
                outcomes.append((status, str(body)))

    loaders = [asyncio.create_task(load()) for _ in range(4)]
    for mode, to in (("direct", slice(2, 4)), ("shared", slice(0, 2))):
        control_plane.stop()
        control_plane.env = {**control_plane.env, "MLLAMBDA_COLOCATED": mode}
        control_plane.start()
        await wait_for(lambda: moved(to), timeout=30)  # noqa: B023 (awaited in this iteration)
        await asyncio.sleep(1)
    done.set()
    await asyncio.gather(*loaders)
    assert len(outcomes) > 100 and set(outcomes) == {answer}, Counter(outcomes).most_common(3)


async def test_a_shared_socket_path_the_gateway_cannot_bind_leaves_the_runtime_on_its_sidecar_and_changes_flowing(
    control_plane: Any, consul_agent: Any, gateway: Any, three_stages: list[Any], tmp_path: Path
) -> None:
    """A directory where the gateway binds a runtime's shared socket, and the gateway Envoy restarted: Envoy
    cannot replace a directory and refuses that listener. The runtime's output goes through its own sidecar,
    every request is answered, and a new pipeline version still enters (the gateway's routes are not held
    back by the listener it refused)."""
    tokenize = three_stages[0]
    apply(control_plane, tmp_path, pipeline("squat"))
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/squat"
    await until_ok(url, {"text": "a b c"})
    squatted = Path(control_plane.run_dir) / f"{tokenize.service_id}@host.sock"
    assert squatted.is_socket()  # the gateway's, bound since the runtime registered
    squatted.unlink()
    squatted.mkdir()
    gateway.proc.stop()
    gateway.proc.start().wait_ready(lambda: admin_stat(gateway.admin_port, "listener_manager.lds.update_rejected") > 0)
    await until_ok(url, {"text": "a b c"})
    sidecar = service_meta(consul_agent.http_port, "tokenize", tokenize.service_id)["envoy_admin_port"]
    before = admin_stat(sidecar, "cluster.count_v1.upstream_rq_total")
    async with aiohttp.ClientSession() as session:
        outcomes = [await post(session, url, {"text": "a b c"}) for _ in range(30)]
    assert {(status, str(body)) for status, body, _ in outcomes} == {(200, str({"count": 3, "score": 30}))}
    assert admin_stat(sidecar, "cluster.count_v1.upstream_rq_total") - before == 30  # its own sidecar took them
    assert squatted.is_dir()  # the gateway did not remove what was there
    apply(control_plane, tmp_path, pipeline("squat", variants=[{"model": "score", "version": "v1", "weight": 100}]))
    await in_traffic(control_plane, "squat", 2)
    async with aiohttp.ClientSession() as session:
        status, body, _ = await post(session, url, {"text": "a b"})
    assert (status, body) == (200, {"count": 2, "score": 20})
