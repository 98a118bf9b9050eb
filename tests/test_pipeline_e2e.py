"""Pipelines through real Envoys: gateway -> sidecars -> runtimes, configured only by the control plane."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.envoy_helpers import wait_for

pytestmark = pytest.mark.slow
M = "examples.trivial.models"


def pipeline(name: str, transport: str = "http", **score: Any) -> dict[str, Any]:
    return {
        "name": name,
        "transport": transport,
        "stages": [
            {"name": "tokenize", "variants": [{"model": "tokenize", "version": "v1"}]},
            {"name": "count", "variants": [{"model": "count", "version": "v1"}]},
            {"name": "score", **(score or {"variants": [{"model": "score", "version": "v1"}]})},
        ],
    }


def apply(control_plane: Any, tmp_path: Path, spec: dict[str, Any]) -> None:
    path = tmp_path / f"{spec['name']}-{id(spec)}.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = control_plane.cli("apply", "-f", str(path))
    assert result.returncode == 0, result.stderr


async def post(session: aiohttp.ClientSession, url: str, payload: Any) -> tuple[int, Any, str]:
    async with session.post(url, json=payload) as resp:
        body = await resp.json(content_type=None)
        return resp.status, body, resp.headers.get("x-mll-served", "")


async def until_ok(url: str, payload: Any, timeout: float = 20) -> tuple[int, Any, str]:
    async with aiohttp.ClientSession() as session:

        async def attempt() -> Any:
            try:
                result = await post(session, url, payload)
            except aiohttp.ClientError:
                return None
            return result if result[0] == 200 else None

        return await wait_for(attempt, timeout=timeout)  # type: ignore[no-any-return]


@pytest.fixture
def three_stages(start_runtime: Any) -> None:
    for model in ("tokenize", "count", "score"):
        start_runtime(f"{M}:{model}", model, "v1")


async def test_three_stage_pipeline_returns_the_composed_result(
    control_plane: Any, gateway: Any, three_stages: None, tmp_path: Path
) -> None:
    apply(control_plane, tmp_path, pipeline("words"))
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/words"
    status, body, served = await until_ok(url, {"text": "the quick brown fox"})
    assert (status, body) == (200, {"count": 4, "score": 40})
    assert served == "tokenize=tokenize:v1, count=count:v1, score=score:v1"

    async with aiohttp.ClientSession() as session:
        status, body, _ = await post(session, url, {"no_text": 1})
        assert status == 422 and "expected {'text'" in body["error"]
        status, body, _ = await post(
            session, f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/nope", {}
        )
        assert status == 404 and "mllambda get pipelines" in body["error"]


async def test_weights_split_traffic_and_change_live(
    control_plane: Any, gateway: Any, three_stages: None, start_runtime: Any, tmp_path: Path
) -> None:
    start_runtime(f"{M}:score_v2", "score", "v2")
    split = {
        "variants": [
            {"model": "score", "version": "v1", "weight": 90},
            {"model": "score", "version": "v2", "weight": 10},
        ]
    }
    apply(control_plane, tmp_path, pipeline("split", **split))
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/split"
    await until_ok(url, {"text": "a b"})

    async def share(n: int) -> tuple[float, int]:
        seen: collections.Counter[str] = collections.Counter()
        failed = 0
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as session:

            async def one() -> None:
                nonlocal failed
                status, body, _ = await post(session, url, {"text": "a b"})
                if status != 200:
                    failed += 1
                else:
                    seen["v2" if body["score"] == 200 else "v1"] += 1

            for chunk in range(0, n, 50):
                await asyncio.gather(*(one() for _ in range(min(50, n - chunk))))
        return seen["v2"] / max(1, sum(seen.values())), failed

    v2_share, failed = await share(2000)
    assert failed == 0
    assert abs(v2_share - 0.10) <= 0.02, v2_share

    split["variants"][0]["weight"] = split["variants"][1]["weight"] = 50  # type: ignore[index]
    apply(control_plane, tmp_path, pipeline("split", **split))
    await asyncio.sleep(1.0)
    v2_share, failed = await share(1000)
    assert failed == 0
    assert abs(v2_share - 0.50) <= 0.05, v2_share
