"""How the control plane reads a runtime's own pages (/profiles, /admission): where, how often, and at most how much."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiohttp

from contract.service import RuntimeService

log = logging.getLogger("mllambda.monitor")


async def poll_forever(poll: Callable[[aiohttp.ClientSession], Awaitable[None]], every: float, what: str) -> None:
    """Every `every` s, one round of reading the runtimes (2 s per answer at most); a round that fails is logged
    and the next one tries again."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            try:
                await poll(session)
            except Exception:
                log.exception("%s failed; the next round tries again", what)
            await asyncio.sleep(every)


async def read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or ValueError past `limit` bytes (`content.read(n)` returns what has arrived so far,
    which for a body of more than a few packets is only its start)."""
    raw = bytearray()
    async for chunk in resp.content.iter_chunked(1 << 16):
        raw += chunk
        if len(raw) > limit:
            raise ValueError(f"answer over {limit} bytes")
    return bytes(raw)


def runtime_url(i: RuntimeService, secure: bool, path: str = "/profiles") -> str:
    """Where to read a runtime's `path` (/profiles, /admission): its own port when it is on this host
    (127.0.0.1); elsewhere, under mTLS, its sidecar's ingress route, which admits the control plane's identity
    only; else nowhere ("")."""
    if i.host == "127.0.0.1" and i.runtime_port:
        return f"http://127.0.0.1:{i.runtime_port}{path}"
    if secure and i.tls_dir and i.ingress_port:
        return i.ingress_url(path)
    return ""
