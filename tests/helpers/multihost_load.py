"""Steady load from inside a test host: `python -m tests.helpers.multihost_load URL SECONDS OUT.json`.

Four clients in a loop, each request with a 2 s timeout; every outcome recorded as
[seconds since start, HTTP status or 0 for no answer, the x-mll-served header (else the body's start)].
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp


async def main(url: str, seconds: float, out: str) -> None:
    outcomes: list[tuple[float, int, str]] = []
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=2)

    async def client(session: aiohttp.ClientSession) -> None:
        while (now := time.monotonic() - started) < seconds:
            try:
                async with session.post(url, json={"x": 1}) as resp:
                    body = await resp.read()
                    said = (
                        resp.headers.get("x-mll-served", "")
                        if resp.status == 200
                        else body[:300].decode(errors="replace")  # Envoy's error names the route
                    )
                    outcomes.append((round(now, 3), resp.status, said))
            except (aiohttp.ClientError, TimeoutError):
                outcomes.append((round(now, 3), 0, ""))
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.02)

    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(4)))
    Path(out).write_text(json.dumps(outcomes))  # noqa: ASYNC240 - once, after the load


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), sys.argv[3]))
