"""How the control plane reads a runtime's own pages (/profiles, /admission): where, and at most how much."""

from __future__ import annotations

import aiohttp

from contract.service import RuntimeService


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
