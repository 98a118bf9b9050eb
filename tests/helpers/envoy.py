"""Helpers for tests that talk to real Envoys and local HTTP servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web

from controlplane.node import processes


@asynccontextmanager
async def http_backend(name: str, seen: list[str] | None = None) -> AsyncIterator[int]:
    """A tiny upstream that answers with its own name (and notes each path in `seen`); yields its port."""

    async def answer(request: web.Request) -> web.Response:
        if seen is not None:
            seen.append(request.path)
        return web.json_response({"backend": name, "path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = processes.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


async def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, every: float = 0.05) -> Any:
    """Poll `predicate` (sync or async) every `every` seconds until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(every)


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        body = await resp.text()
        try:
            return resp.status, json.loads(body)
        except ValueError:
            return resp.status, body


def envoy_stat(envoy: Any, name: str) -> int:
    """One counter or gauge from an Envoy's admin /stats (0 if it does not exist yet)."""
    return admin_stat(envoy.admin_port, name)


def admin_stat(admin_port: int | str, name: str) -> int:
    """One counter or gauge from the Envoy whose admin port this is (0 if it does not exist yet)."""
    _, text = processes.http_get(f"http://127.0.0.1:{admin_port}/stats?filter=^{name}$")
    return int(text.split(":")[1]) if ":" in text else 0


def config_dump(admin_port: int) -> dict[str, Any]:
    status, body = processes.http_get(f"http://127.0.0.1:{admin_port}/config_dump")
    assert status == 200, body
    return dict(json.loads(body))


def dynamic_names(dump: dict[str, Any], kind: str) -> dict[str, str]:
    """name -> version_info of the active dynamic resources of one kind in a config dump."""
    names: dict[str, str] = {}
    for section in dump["configs"]:
        if kind == "clusters" and "dynamic_active_clusters" in section:
            for item in section["dynamic_active_clusters"]:
                names[item["cluster"]["name"]] = item["version_info"]
        if kind == "listeners" and "dynamic_listeners" in section:
            for item in section["dynamic_listeners"]:
                if "active_state" in item:
                    names[item["name"]] = item["active_state"]["version_info"]
        if kind == "routes" and "dynamic_route_configs" in section:
            for item in section["dynamic_route_configs"]:
                names[item["route_config"]["name"]] = item["version_info"]
    return names


def near_share(count: float, n: float, p: float) -> bool:
    """Whether `count` of `n` independent picks is what a share of `p` gives: within 4.5 binomial standard
    deviations, a false alarm once in ~150,000 runs (3 sigma failed a correct split every few hundred CI runs).
    At 2,000 picks of 10% that is +-3.0 pp; a weight that is ignored or swapped is still far outside."""
    return abs(count / n - p) <= 4.5 * (p * (1 - p) / n) ** 0.5
