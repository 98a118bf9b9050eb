"""Pipelines from a test's side: definitions, apply through the CLI, requests through the gateway, waits."""

from __future__ import annotations

import asyncio
import collections
import json
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from controlplane.node.processes import http_get
from tests.helpers.envoy import get_json, wait_for

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


async def in_traffic(control_plane: Any, name: str, version: int, timeout: float = 60) -> None:
    """Wait until the gateway enters `version` of pipeline `name` (the staged switch is done)."""

    async def entered() -> bool:
        _, status = await get_json(f"http://127.0.0.1:{control_plane.metrics_port}/api/status")
        return any(p["name"] == name and p["serving"].get("entry") == version for p in status["pipelines"])

    await wait_for(entered, timeout=timeout)


async def post(session: aiohttp.ClientSession, url: str, payload: Any) -> tuple[int, Any, str]:
    async with session.post(url, json=payload) as resp:
        body = await resp.json(content_type=None)
        return resp.status, body, resp.headers.get("x-mll-served", "")


async def until_ok(url: str, payload: Any, timeout: float = 20) -> tuple[int, Any, str]:
    """Retry until the pipeline answers 200 (config takes a moment to reach every Envoy)."""
    last: Any = None
    async with aiohttp.ClientSession() as session:

        async def attempt() -> Any:
            nonlocal last
            try:
                last = await post(session, url, payload)
            except aiohttp.ClientError as err:
                last = err
                return None
            return last if last[0] == 200 else None

        try:
            return await wait_for(attempt, timeout=timeout)  # type: ignore[no-any-return]
        except AssertionError:
            raise AssertionError(f"{url} never answered 200; last: {last}") from None


def service_meta(consul_port: int, model: str, service_id: str) -> dict[str, str]:
    """What a runtime registered about itself (ports, socket paths), as Consul's catalog has it."""
    _, body = http_get(f"http://127.0.0.1:{consul_port}/v1/catalog/service/{model}")
    return next(e["ServiceMeta"] for e in json.loads(body) if e["ServiceID"] == service_id)


def runtime_metric(consul_port: int, model: str, service_id: str, name: str) -> int:
    """Sum of one metric from a runtime's own /metrics (its port found in Consul)."""
    port = service_meta(consul_port, model, service_id)["runtime_port"]
    _, metrics = http_get(f"http://127.0.0.1:{port}/metrics")
    return int(
        sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith((name + "{", name + " ")))
    )


def runtime_requests(consul_port: int, model: str, service_id: str) -> int:
    """Requests a runtime has answered over HTTP."""
    return runtime_metric(consul_port, model, service_id, "mllambda_runtime_requests_total")


async def switch_under_load(
    control_plane: Any, tmp_path: Path, name: str, transports: list[str], pause: float
) -> collections.Counter[int]:
    """Apply each transport in turn while four clients send requests; count outcomes (-status: wrong body)."""
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/{name}"
    apply(control_plane, tmp_path, pipeline(name))
    await until_ok(url, {"text": "a b c"})
    outcomes: collections.Counter[int] = collections.Counter()
    stop = asyncio.Event()

    async def steady() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                status, body, _ = await post(session, url, {"text": "a b c"})
                outcomes[status if body == {"count": 3, "score": 30} else -status] += 1

    load = [asyncio.create_task(steady()) for _ in range(4)]
    for transport in transports:
        await asyncio.sleep(pause)  # load duration between changes
        apply(control_plane, tmp_path, pipeline(name, transport=transport))
    await asyncio.sleep(pause)  # load duration after the last
    stop.set()
    await asyncio.gather(*load)
    return outcomes
