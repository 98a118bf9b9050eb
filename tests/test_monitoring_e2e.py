"""Agreement between a shadow and the version it shadows, on the same requests, through real Envoys."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from controlplane.node.processes import http_get
from tests.helpers.envoy import wait_for
from tests.helpers.pipelines import M, apply, post, until_ok


async def test_a_shadow_that_answers_another_class_for_one_request_in_five_agrees_four_in_five(
    control_plane: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    runtimes = [("tokenize", "tokenize", "v1"), ("count", "count", "v1"), ("length_class", "classify", "v1"),
                ("length_class_flips", "classify", "v2")]  # fmt: skip
    for target, model, version in runtimes:
        start_runtime(f"{M}:{target}", model, version, extra=("--profile-percent=100",))
    spec = {
        "name": "agree",
        "stages": [
            {"name": "tokenize", "variants": [{"model": "tokenize", "version": "v1"}]},
            {"name": "count", "variants": [{"model": "count", "version": "v1"}]},
            {"name": "classify", "variants": [{"model": "classify", "version": "v1"}],
             "shadow": {"model": "classify", "version": "v2", "percent": 100}},
        ],
    }  # fmt: skip
    apply(control_plane, tmp_path, spec)
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/agree"
    await until_ok(url, {"text": "a b"})
    texts = ["a", "a b c d e", "one two", "the quick brown fox jumps"]
    async with aiohttp.ClientSession() as session:
        for _ in range(10):
            answers = await asyncio.gather(*(post(session, url, {"text": texts[i % 4]}) for i in range(60)))
            assert {status for status, _, _ in answers} == {200}
            assert all(served.endswith("classify=classify:v1") for _, _, served in answers)  # the shadow answers no one

    async def measured() -> list[dict[str, Any]]:
        done = await asyncio.to_thread(control_plane.cli, "monitor", "status", "classify:v2", "-o", "json")
        rows = json.loads(done.stdout)["items"]
        found = rows[0]["agreement"] if rows else []
        await asyncio.sleep(1)
        return found if sum(a["pairs"] for a in found if a["field"] == "category") >= 500 else []

    found = {a["field"]: a for a in await wait_for(measured, timeout=45)}  # windows close, then are read
    assert found["category"]["against"] == "classify:v1" and abs(found["category"]["agreement"] - 0.8) <= 0.03, found
    assert found["count"]["agreement"] == 1.0  # what the shadow passes on unchanged agrees
    metrics = http_get(f"http://127.0.0.1:{control_plane.metrics_port}/metrics")[1]
    line = next(
        x for x in metrics.splitlines() if x.startswith("mllambda_model_agreement{") and 'field="category"' in x
    )
    assert 'model="classify"' in line and 'version="v2"' in line and 'against="classify:v1"' in line
    assert abs(float(line.rsplit(" ", 1)[1]) - 0.8) <= 0.03
