"""The baseline: one aiohttp server per stage, each calling the next directly (no Envoy, no SDK).

`--client hop` calls the next stage with the runtime SDK's client (runtime_sdk/hop.py) instead of aiohttp's:
the same chain with the same client ML Lambda's runtimes use, so that a comparison isolates the mesh.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from yarl import URL

from runtime_sdk.hop import HopClient


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--predict", required=True, help="MODULE:CALLABLE")
    parser.add_argument("--next", help="URL of the next stage")
    parser.add_argument("--client", choices=["aiohttp", "hop"], default="aiohttp")
    parser.add_argument("--max-body", type=int, default=64 * 1024 * 1024, help="bytes a request may have")
    args = parser.parse_args()
    next_url = URL(args.next) if args.next else None
    hop = HopClient(port=next_url.port) if next_url and args.client == "hop" else None
    next_path = next_url.path if next_url else "/"
    module, _, name = args.predict.partition(":")
    predict = getattr(importlib.import_module(module), name)
    session: dict[str, aiohttp.ClientSession] = {}

    async def handle(request: web.Request) -> web.Response:
        payload = await request.json()
        output = await predict(payload) if asyncio.iscoroutinefunction(predict) else predict(payload)
        if not args.next:
            return web.json_response(output)
        if hop is not None:
            answer = await hop.post(next_path, json.dumps(output), {"content-type": "application/json"})
            return web.Response(body=answer.body, status=answer.status, content_type="application/json")
        async with session["next"].post(args.next, data=json.dumps(output)) as resp:
            return web.Response(body=await resp.read(), status=resp.status, content_type="application/json")

    async def client(app: web.Application) -> AsyncIterator[None]:
        session["next"] = aiohttp.ClientSession()
        yield
        await session["next"].close()

    app = web.Application(client_max_size=args.max_body)
    app.router.add_post("/{tail:.*}", handle)
    app.cleanup_ctx.append(client)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
