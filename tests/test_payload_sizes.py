"""A pipeline's max_body through the real gateway, sidecars, runtimes and Kafka: a body just under it is served over
http, uds and kafka; one just over it is a 413 at the gateway, with or without a Content-Length, and no stage
sees it."""

from __future__ import annotations

import asyncio
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
        spec = {
            "name": "big",
            "transport": transport,
            "max_body": "2Mi",
            "stages": [{"name": "echo", "variants": [{"model": "echo", "version": "v1"}]}],
        }
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


REFUSALS = [  # (how it is sent, the status the caller gets, what its answer says, whose refusal it is)
    ("length", 413, b"the limit is 1048576 bytes", "runtime"),  # a body over the runtime's --max-body
    ("chunked", 413, b"the limit is 1048576 bytes", "runtime"),  # the same, chunked (the gateway buffers it)
    ("fields-94", 200, b"small", "-"),  # the gateway takes them and adds its own: the runtime takes all
    ("fields-101", 431, b"", "gateway"),  # over Envoy's 100
    ("head", 431, b"", "gateway"),  # a head over Envoy's 60 KiB
    ("bad-chunk", 400, b"", "gateway"),  # a chunk size line that is not hex
    ("smuggle", 400, b"", "gateway"),  # both a Content-Length and chunks
]


async def raw_exchange(port: int, raw: bytes) -> tuple[int, bytes]:
    """Send `raw` bytes to the gateway; the status and body of its answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
        body = await asyncio.wait_for(reader.readexactly(int(fields.get("content-length", "0"))), 20)
        return int(lines[0].split(" ")[1]), body
    finally:
        writer.close()


async def test_each_refusal_reaches_the_caller_as_itself_through_the_gateway(
    control_plane: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    """Every class of refusal a caller can meet on the way to a runtime (issue 41), through the real gateway Envoy
    and runtime: the status and reason of whoever refuses (the runtime's own JSON reason where it is the runtime),
    never a 503 reset; and what the gateway takes, the runtime takes too. Each three times, and a request after
    each is served on the same connections."""
    start_runtime(f"{M}:echo", "echo", "v1", extra=("--max-body=1048576",))
    spec = {
        "name": "tight",
        "max_body": "4Mi",
        "stages": [{"name": "echo", "variants": [{"model": "echo", "version": "v1"}]}],
    }
    apply(control_plane, tmp_path, spec)
    port = control_plane.gateway_port
    url = f"http://127.0.0.1:{port}/pipelines/tight"
    await until_ok(url, {"text": "warm"})
    big = body_of(3 * 1024 * 1024)
    start = "POST /pipelines/tight HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    small = json.dumps({"text": "small"}).encode()
    fields = lambda n: "".join(f"x-f{i}: {i}\r\n" for i in range(n))  # noqa: E731
    raws = {
        "fields-94": f"{start}{fields(94 - 2)}content-length: {len(small)}\r\n\r\n".encode() + small,
        "fields-101": f"{start}{fields(101 - 2)}content-length: {len(small)}\r\n\r\n".encode() + small,
        "head": f"{start}x-big: {'a' * 61 * 1024}\r\ncontent-length: 2\r\n\r\n{{}}".encode(),
        "bad-chunk": f"{start}transfer-encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n".encode(),
        "smuggle": f"{start}content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n".encode(),
    }
    async with aiohttp.ClientSession() as session:
        for how, status, says, whose in REFUSALS:
            for _ in range(3):  # the same connections again: a refusal leaves the next request unharmed
                if how in raws:
                    got, said = await raw_exchange(port, raws[how])
                else:
                    data = big if how == "length" else chunks(big)
                    async with session.post(url, data=data, headers={"content-type": "application/json"}) as resp:
                        got, said = resp.status, await resp.read()
                assert (got, says in said) == (status, True), (how, got, said[:300])
                if whose == "runtime":
                    assert "error" in json.loads(said), (how, said[:300])  # the runtime's JSON reason, as it sent it
                async with session.post(url, json={"text": "small"}) as resp:
                    assert resp.status == 200, (how, resp.status)
