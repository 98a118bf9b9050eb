"""Same-host delivery through real Envoys: a sender reaches a runtime on its own host at the runtime's socket,
its sidecar's ingress untouched; the answers, headers and refusals are those of the hop through the ingress."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.envoy_helpers import admin_stat, wait_for
from tests.test_pipeline_e2e import apply, pipeline, post, service_meta, until_ok

pytestmark = pytest.mark.slow
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
    answer = (200, '{"count": 3, "score": 30}', served)
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
    sender = start_runtime("examples.trivial.models:tokenize", "tokenize", "v1")
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
    admin = service_meta(consul_agent.http_port, "tokenize", sender.service_id)["envoy_admin_port"]
    assert admin_stat(admin, "cluster.count_v1.upstream_rq_retry") > 0, "the killed replica was never tried"
