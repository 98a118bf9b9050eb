"""A pipeline's max_body through the real gateway, sidecars, runtimes and Kafka: a body just under it is served over
http, uds and kafka; one just over it is a 413 at the gateway, with or without a Content-Length, and no stage
sees it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.common import runtime_codes
from controlplane.node import processes
from tests.helpers.pipelines import M, apply, in_traffic, until_ok

pytestmark = pytest.mark.slow
LIMIT = 2 * 1024 * 1024  # over aiokafka's and the runtime's old 1 MiB defaults


def body_of(size: int) -> bytes:
    """A JSON object of exactly `size` bytes."""
    empty = len(json.dumps({"text": ""}).encode())
    return json.dumps({"text": "x" * (size - empty)}).encode()


async def chunks(body: bytes) -> Any:
    for start in range(0, len(body), 256 * 1024):
        yield body[start : start + 256 * 1024]


async def test_a_body_over_the_pipelines_max_body_is_a_413_at_the_gateway_and_one_under_it_is_served(
    kafka_plane: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    echo = start_runtime(f"{M}:echo", "echo", "v1")
    url = f"http://127.0.0.1:{kafka_plane.gateway_port}/pipelines/big"
    under, over = body_of(LIMIT - 16), body_of(LIMIT + 1)
    headers = {"content-type": "application/json"}
    for version, transport in enumerate(("http", "uds", "kafka"), 1):
        spec = {"name": "big", "transport": transport, "max_body": "2Mi",
                "stages": [{"name": "echo", "variants": [{"model": "echo", "version": "v1"}]}]}  # fmt: skip
        apply(kafka_plane, tmp_path, spec)
        await in_traffic(kafka_plane, "big", version)
        await until_ok(url, {"text": "warm"}, timeout=60)
        seen = runtime_codes(kafka_plane.consul_port, "echo", echo.service_id)
        async with aiohttp.ClientSession() as session:
            async with session.post(url, data=under, headers=headers) as resp:
                assert resp.status == 200, (transport, resp.status, (await resp.read())[:300])
                assert json.loads(await resp.read()) == json.loads(under), transport  # echoed whole
            async with session.post(url, data=over, headers=headers) as resp:
                refusal = await resp.json(content_type=None)
                assert resp.status == 413, (transport, refusal)
                assert refusal["max_body"] == LIMIT and "max_body of pipeline big" in refusal["error"], refusal
            async with session.post(url, data=chunks(over), headers=headers) as resp:  # no Content-Length
                assert resp.status == 413, (transport, (await resp.read())[:300])
            async with session.post(url, data=chunks(under), headers=headers) as resp:
                assert resp.status == 200 and json.loads(await resp.read()) == json.loads(under), transport
        answered = runtime_codes(kafka_plane.consul_port, "echo", echo.service_id)
        if transport != "kafka":  # over Kafka the runtime answers records, counted apart from HTTP requests
            assert answered - seen == {"200": 2}, (transport, seen, answered)  # the refused ones never reached it
        assert "413" not in answered, answered

    # A runtime holds a pipeline's limit as its sidecar tells it with each request, whoever else sends.
    _, found = processes.http_get(f"http://127.0.0.1:{kafka_plane.consul_port}/v1/catalog/service/echo")
    port = json.loads(found)[0]["ServiceMeta"]["runtime_port"]
    told = {**headers, "x-mll-max-body": "1024", "x-mll-stage": "echo"}
    async with aiohttp.ClientSession() as session:
        direct = f"http://127.0.0.1:{port}/pipelines/big/v3/echo"
        async with session.post(direct, data=body_of(2048), headers=told) as resp:
            assert resp.status == 413 and b"the limit is 1024 bytes" in await resp.read()

    # A limit no stage could take is refused, with what to write instead.
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({**spec, "max_body": "3Gi"}))
    refused = kafka_plane.cli("apply", "-f", str(path))
    assert refused.returncode != 0 and "max_body: a size in bytes, or with Ki or Mi" in refused.stderr, refused.stderr
    path.write_text(json.dumps({**spec, "max_body": "100Mi"}))
    refused = kafka_plane.cli("apply", "-f", str(path))
    assert refused.returncode != 0 and "between 1024 bytes and 64Mi" in refused.stderr, refused.stderr


async def test_a_runtime_that_refuses_a_body_before_reading_it_is_heard_through_envoy(
    control_plane: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    """A runtime's own limit below the pipeline's: its 413 and reason reach the caller, not a 503 reset."""
    start_runtime(f"{M}:echo", "echo", "v1", extra=("--max-body=1048576",))
    spec = {
        "name": "tight",
        "max_body": "4Mi",
        "stages": [{"name": "echo", "variants": [{"model": "echo", "version": "v1"}]}],
    }
    apply(control_plane, tmp_path, spec)
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/tight"
    await until_ok(url, {"text": "warm"})
    async with aiohttp.ClientSession() as session:
        for _ in range(5):  # the same connections again: each refusal leaves the next request unharmed
            async with session.post(
                url, data=body_of(3 * 1024 * 1024), headers={"content-type": "application/json"}
            ) as resp:
                said = await resp.read()
                assert resp.status == 413 and b"the limit is 1048576 bytes" in said, (resp.status, said[:300])
            async with session.post(url, json={"text": "small"}) as resp:
                assert resp.status == 200
