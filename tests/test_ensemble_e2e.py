"""Ensembles through real Envoys: one stage asks several models at once and joins their answers."""

from __future__ import annotations

import asyncio
import collections
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.common import runtime_codes
from tests.helpers.components import consul_passing
from tests.helpers.envoy import get_json, near_share, wait_for
from tests.helpers.pipelines import M, apply, in_traffic, post, until_ok

pytestmark = pytest.mark.slow
TEXT = {"text": "a quick brown fox"}


def ensemble(*members: dict[str, Any], transport: str = "http", join: bool = True) -> dict[str, Any]:
    stage: dict[str, Any] = {"name": "vote", "timeout_ms": 3000, "members": list(members)}
    if join:
        stage["join"] = {"model": "joiner", "version": "v1"}
    return {
        "name": "ens",
        "transport": transport,
        "stages": [{"name": "tokenize", "variants": [{"model": "tokenize", "version": "v1"}]}, stage],
    }


COUNT = {"name": "a", "variants": [{"model": "count", "version": "v1"}]}
LONGEST = {
    "name": "b",
    "variants": [
        {"model": "longest", "version": "v1", "weight": 90},
        {"model": "longest", "version": "v2", "weight": 10},
    ],
}
SLEEPY = {"name": "slow", "required": False, "timeout_ms": 300, "variants": [{"model": "sleepy", "version": "v1"}]}
BROKEN = {"name": "bad", "variants": [{"model": "broken", "version": "v1"}]}


@pytest.fixture
def runtimes(start_runtime: Any, consul_agent: Any) -> dict[str, Any]:
    """The members' runtimes, passing, by "model:version"."""
    started = [
        start_runtime(f"{M}:{target}", model, version, wait=False)
        for target, model, version in [
            ("tokenize", "tokenize", "v1"),
            ("count", "count", "v1"),
            ("longest", "longest", "v1"),
            ("longest", "longest", "v2"),
            ("sleepy", "sleepy", "v1"),
            ("broken", "broken", "v1"),
            ("join_answers", "joiner", "v1"),
        ]
    ]
    for r in started:
        r.proc.wait_ready(lambda r=r: consul_passing(consul_agent.http_port, r.model, r.service_id), timeout=60)
    return {f"{r.model}:{r.version}": r for r in started}


async def test_ensemble_joins_members_keeps_their_weights_and_reports_failures(
    control_plane: Any, consul_agent: Any, gateway: Any, runtimes: dict[str, Any], tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/ens"

    # Two members and a join: both answers reach the join, every member in the served chain.
    apply(control_plane, tmp_path, ensemble(COUNT, LONGEST))
    status, body, served = await until_ok(url, TEXT)
    assert body == {"count": 4, "longest": "quick", "left_out": []}
    assert served.startswith("tokenize=tokenize:v1, vote.a=count:v1, vote.b=longest:v")
    assert served.endswith("vote=joiner:v1")

    # Weights inside a member still hold: 90/10 over 2,000 requests.
    seen: collections.Counter[str] = collections.Counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:

        async def one() -> None:
            status, _, served = await post(session, url, TEXT)
            seen[served.split("vote.b=")[1].split(",")[0] if status == 200 else f"failed {status}"] += 1

        for _ in range(40):
            await asyncio.gather(*(one() for _ in range(50)))
    assert set(seen) == {"longest:v1", "longest:v2"}, seen
    assert near_share(seen["longest:v2"], 2000, 0.10), seen

    # Each member's answers are paired with the join's on the same requests (the fields both answer).
    last: dict[str, Any] = {}

    async def agreement() -> dict[str, dict[str, Any]]:
        done = await asyncio.to_thread(control_plane.cli, "monitor", "status", "-o", "json")
        rows = {f"{r['model']}:{r['version']}": r["agreement"] for r in json.loads(done.stdout)["items"]}
        last.update(rows)
        found = {name: {a["field"]: a for a in found} for name, found in rows.items() if found}
        return found if sum(a["pairs"] for a in found.get("count:v1", {}).values()) >= 500 else {}

    try:
        found = await wait_for(agreement, timeout=60, every=1)  # windows close (10 s), then are read (every 10 s)
    except AssertionError as err:
        kept = {}
        for model in ("count", "joiner"):
            _, found_ = await get_json(f"http://127.0.0.1:{consul_agent.http_port}/v1/catalog/service/{model}")
            port = found_[0]["ServiceMeta"]["runtime_port"]
            _, profiles = await get_json(f"http://127.0.0.1:{port}/profiles?after=0")
            kept[model] = [(w["requests"], len(w["answers"]), list(w["answers"])[:2]) for w in profiles["windows"]]
        raise AssertionError(f"no agreement of count:v1 with the join yet: {json.dumps(last)[:2000]} {kept}") from err
    assert set(found["count:v1"]) == {"count"} and found["count:v1"]["count"]["against"] == "joiner:v1"
    assert found["count:v1"]["count"]["agreement"] == 1.0 and found["longest:v1"]["longest"]["agreement"] == 1.0

    # Over Unix sockets, with an optional member that answers too late: left out and marked,
    # and the answer arrives once its 300 ms are up, well within the stage's 3 s.
    apply(control_plane, tmp_path, ensemble(COUNT, LONGEST, SLEEPY, transport="uds"))
    await in_traffic(control_plane, "ens", 2)
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        status, body, served = await post(session, url, TEXT)
        took = time.monotonic() - started
    assert (status, body) == (200, {"count": 4, "longest": "quick", "left_out": ["slow"]}), served
    assert 0.3 <= took < 1.5, took

    # What a person reads: the members in describe, a traffic row per member in status and on the dashboard.
    described = control_plane.cli("describe", "pipeline", "ens").stdout
    assert "member slow (optional, timeout 300ms): sleepy:v1 weight=1" in described, described
    assert "join joiner:v1" in described
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{control_plane.metrics_port}/") as resp:
        page = re.sub(r"<[^>]+>", "", await resp.text())  # the words a person reads, without the markup
    assert "member b: longest:v1 90%, longest:v2 10%" in page and "join: joiner:v1 100%" in page
    _, status_body = await get_json(f"http://127.0.0.1:{control_plane.metrics_port}/api/status")
    rows = {(t["branch"], t["version"]): t for t in status_body["traffic"] if t["pipeline"] == "ens"}
    assert (rows["b", "v1"]["configured_share"], rows["b", "v2"]["configured_share"]) == (0.9, 0.1)
    assert {branch for branch, _ in rows} == {"", "a", "b", "slow", "(join)"}  # "": the first stage

    # Without a join the merged answers are the result; an optional member's reason is kept.
    apply(control_plane, tmp_path, ensemble(COUNT, SLEEPY, join=False))
    await in_traffic(control_plane, "ens", 3)
    async with aiohttp.ClientSession() as session:
        status, body, _ = await post(session, url, TEXT)
    assert status == 200, body
    assert body["a"] == {"tokens": ["a", "quick", "brown", "fox"], "count": 4}
    assert set(body) == {"a", "_missing"} and "timed out after 300 ms" in body["_missing"]["slow"]
    left_out_at = time.monotonic()

    # A required member that fails fails the request, with an error that names it.
    apply(control_plane, tmp_path, ensemble(COUNT, BROKEN))
    await in_traffic(control_plane, "ens", 4)
    async with aiohttp.ClientSession() as session:
        status, body, served = await post(session, url, TEXT)
    assert status == 502, body
    assert "ensemble 'vote': required member 'bad' failed: answered 500" in body["error"], body
    assert body["member"] == "bad"
    assert "vote.bad=broken:v1" in served

    # The member left out was stopped when its 300 ms were up, not run to its end (2 s) for nobody.
    await asyncio.sleep(max(0.0, left_out_at + 2.3 - time.monotonic()))  # time passing is what is tested
    sleepy = runtimes["sleepy:v1"]
    assert runtime_codes(consul_agent.http_port, "sleepy", sleepy.service_id) == {"499": 2}
