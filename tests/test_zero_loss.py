"""Config changes under load lose nothing: every request answers 200 with what its version computes.

Eight clients send requests without pause while 22 changes go through `mllambda
apply`: HTTP <-> Unix sockets <-> Kafka, a stage inserted and removed, weights
changed, a branch stage added and its branches swapped. Each answer must be
exactly what the stages it went through (its `x-mll-served` chain) compute, so
a request that started on one version and finished on another would show.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from controlplane.node import processes
from tests.helpers.components import passing
from tests.helpers.envoy import wait_for
from tests.helpers.pipelines import M, apply, in_traffic, until_ok

pytestmark = pytest.mark.slow
NAME = "steady"
TEXT = {"text": "a b c"}  # 3 words: count 3, category "short"

TOKENIZE = {"name": "tokenize", "variants": [{"model": "tokenize", "version": "v1"}]}
COUNT = {"name": "count", "variants": [{"model": "count", "version": "v1"}]}
CLASSIFY = {"name": "classify", "variants": [{"model": "classify", "version": "v1"}]}


def score(v1: int = 1, v2: int = 0) -> dict[str, Any]:
    weights = [("v1", v1), ("v2", v2)]
    return {"name": "score", "variants": [{"model": "score", "version": v, "weight": w} for v, w in weights if w]}


def answer(swapped: bool = False) -> dict[str, Any]:
    short, long = ("long", "short") if swapped else ("short", "long")
    return {
        "name": "answer",
        "branch_on": "category",
        "branches": [
            {"key": "short", "variants": [{"model": short, "version": "v1"}]},
            {"key": "long", "variants": [{"model": long, "version": "v1"}]},
        ],
    }


def spec(transport: str, *stages: dict[str, Any]) -> dict[str, Any]:
    return {"name": NAME, "transport": transport, "stages": list(stages)}


CHANGES = [
    spec("uds", TOKENIZE, COUNT, score()),
    spec("http", TOKENIZE, COUNT, score()),
    spec("kafka", TOKENIZE, COUNT, score()),
    spec("http", TOKENIZE, COUNT, score()),
    spec("http", TOKENIZE, COUNT, score(90, 10)),  # weights
    spec("http", TOKENIZE, COUNT, CLASSIFY, score(90, 10)),  # a stage inserted
    spec("uds", TOKENIZE, COUNT, CLASSIFY, score(90, 10)),
    spec("uds", TOKENIZE, COUNT, score(90, 10)),  # ... and removed
    spec("kafka", TOKENIZE, COUNT, score(90, 10)),
    spec("uds", TOKENIZE, COUNT, score(50, 50)),
    spec("http", TOKENIZE, COUNT, CLASSIFY, answer()),  # a branch stage
    spec("http", TOKENIZE, COUNT, CLASSIFY, answer(swapped=True)),  # its branches swapped
    spec("uds", TOKENIZE, COUNT, CLASSIFY, answer(swapped=True)),
    spec("kafka", TOKENIZE, COUNT, CLASSIFY, answer(swapped=True)),
    spec("http", TOKENIZE, COUNT, CLASSIFY, answer()),
    spec("http", TOKENIZE, COUNT, score(1, 1)),
    spec("kafka", TOKENIZE, COUNT, score(1, 1)),
    spec("uds", TOKENIZE, COUNT, score(0, 1)),
    spec("http", TOKENIZE, COUNT, score(1, 0)),
    spec("http", TOKENIZE, COUNT, CLASSIFY, score(1, 0)),
    spec("uds", TOKENIZE, COUNT, score(1, 0)),
    spec("http", TOKENIZE, COUNT, score(1, 0)),
]

# What each hop computes on TEXT, keyed by "stage=model:version": the answer a chain must give.
LAST_HOP_ANSWERS = {
    "score=score:v1": {"count": 3, "score": 30},
    "score=score:v2": {"count": 3, "score": 300},
    "answer=short:v1": {"category": "short", "answer": "short text"},
    "answer=long:v1": {"category": "short", "answer": "long text"},
}
CHAINS = {  # the stage lists a version can have
    ("tokenize", "count", "score"),
    ("tokenize", "count", "classify", "score"),
    ("tokenize", "count", "classify", "answer"),
}


def verdict(status: int, body: Any, served: str) -> str:
    """'ok', or what is wrong with this answer."""
    if status != 200:
        return f"{status} {json.dumps(body)[:120]}"
    hops = [hop.strip() for hop in served.split(",") if hop.strip()]
    stages = tuple(hop.split("=")[0] for hop in hops)
    if stages not in CHAINS:
        return f"chain {served!r}"
    if body != LAST_HOP_ANSWERS.get(hops[-1]):
        return f"answer {body} for chain {served!r}"
    return "ok"


async def test_twenty_two_changes_under_load_fail_no_request(
    kafka_plane: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    for target, model, version in [
        ("tokenize", "tokenize", "v1"),
        ("count", "count", "v1"),
        ("length_class", "classify", "v1"),
        ("score", "score", "v1"),
        ("score_v2", "score", "v2"),
        ("short_model", "short", "v1"),
        ("long_model", "long", "v1"),
    ]:
        start_runtime(f"{M}:{target}", model, version, wait=False)
    for model, replicas in [("tokenize", 1), ("count", 1), ("classify", 1), ("score", 2), ("short", 1), ("long", 1)]:
        await wait_for(lambda m=model, n=replicas: _passing(kafka_plane, m) >= n, timeout=60)
    url = f"http://127.0.0.1:{kafka_plane.gateway_port}/pipelines/{NAME}"
    apply(kafka_plane, tmp_path, spec("http", TOKENIZE, COUNT, score()))
    await until_ok(url, TEXT)

    outcomes: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()
    started = time.monotonic()
    changing = "1 (http)"  # what the failure report says was going on
    bad: list[str] = []  # the first few answers that were not ok: when, how long, during which change

    async def client() -> None:
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    async with session.post(url, json=TEXT) as resp:
                        body = await resp.json(content_type=None)
                        said = verdict(resp.status, body, resp.headers.get("x-mll-served", ""))
                except (aiohttp.ClientError, TimeoutError) as err:
                    said = f"client error {type(err).__name__}"
                outcomes[said] += 1
                if said != "ok" and len(bad) < 10:
                    took = time.monotonic() - sent
                    bad.append(f"{said} sent at {sent - started:.1f}s, took {took:.1f}s, during {changing}")

    load = [asyncio.create_task(client()) for _ in range(8)]
    try:
        for version, change in enumerate(CHANGES, start=2):
            await asyncio.sleep(0.5)  # load duration between changes
            changing = f"{version - 1} -> {version} ({change['transport']}) at {time.monotonic() - started:.1f}s"
            apply(kafka_plane, tmp_path, change)
            # In traffic: the gateway enters the new version.
            await in_traffic(kafka_plane, NAME, version)
        await asyncio.sleep(1)  # load duration after the last change
    finally:
        stop.set()
        await asyncio.gather(*load)
    assert set(outcomes) == {"ok"}, (outcomes, bad)
    assert outcomes["ok"] > 500, outcomes


def _passing(control_plane: Any, model: str) -> int:
    url = f"http://127.0.0.1:{control_plane.consul_port}/v1/health/service/{model}?passing=true"
    status, body = processes.http_get(url)
    return len(json.loads(body)) if status == 200 else 0


def sidecar_pid(service_id: str) -> int:
    """The Envoy sidecar a runtime started (its bootstrap file is named after the service id)."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(f"{service_id}-envoy.yaml".encode()) for arg in argv):
            return int(entry.name)
    raise AssertionError(f"no sidecar process for {service_id}")


async def test_a_sidecar_that_does_not_acknowledge_holds_the_change_back_and_is_named(
    control_plane: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    *_, frozen = passing(
        *(start_runtime(f"{M}:{model}", model, "v1", wait=False) for model in ("tokenize", "count", "score")),
        start_runtime(f"{M}:length_class", "classify", "v1", wait=False),
    )
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/{NAME}"
    apply(control_plane, tmp_path, spec("http", TOKENIZE, COUNT, score()))
    await until_ok(url, TEXT)
    pid = sidecar_pid(frozen.service_id)
    os.kill(pid, signal.SIGSTOP)  # connected, but answers nothing: it never acknowledges
    try:
        change = tmp_path / "with-classify.yaml"
        change.write_text(yaml.safe_dump(spec("http", TOKENIZE, COUNT, CLASSIFY, score())))
        waited = control_plane.cli("apply", "-f", str(change), "--wait", "--timeout", "3")
        assert waited.returncode == 1, waited.stdout + waited.stderr
        assert "version 2 is not in traffic after 3s" in waited.stderr and frozen.service_id in waited.stderr
        described = control_plane.cli("describe", "pipeline", NAME)
        assert "version 2 is not in traffic yet" in described.stdout, described.stdout
        assert frozen.service_id in described.stdout and "version 1 serves meanwhile" in described.stdout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            for _ in range(20):  # still version 1, and every request answered
                async with session.post(url, json=TEXT) as resp:
                    assert resp.status == 200
                    assert resp.headers["x-mll-served"].count(",") == 2  # three stages: no classify yet
    finally:
        os.kill(pid, signal.SIGCONT)
    waited = control_plane.cli("apply", "-f", str(change), "--wait")
    assert waited.returncode == 0 and "pipeline/steady version 2 in traffic" in waited.stdout, waited.stderr
    _, body, served = await until_ok(url, TEXT)
    assert "classify=classify:v1" in served and body == {"count": 3, "score": 30}
