"""How a runtime sends its output on: to its own sidecar's egress, or to the host's shared Envoy."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy

from contract import headers as h
from contract.service import shared_egress_socket

SHARED_RETRY_S = 1.0  # the host's shared Envoy refused: the own sidecar forwards for this long, then try again
# Errors where a request did not reach Envoy: no connection, or one closed while idle (a listener draining
# closes only idle connections; one with a request in flight gets its answer first).
UNSENT = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError)


@dataclass
class Egress:
    """How this runtime reaches its own sidecar's egress listener, and the host's shared one if it is there.

    The control plane has the gateway Envoy carry the output of runtimes on its host (`--colocated shared`,
    docs/architecture.md "One Envoy for the host"), at a socket next to the egress socket
    (`shared_egress_socket`). Whether it does can change at any time: what it cannot do goes to the own
    sidecar, which always has the same routes (`post`).
    """

    tcp_port: int | None = None
    uds_path: str | None = None
    sessions: dict[str, aiohttp.ClientSession] = field(default_factory=dict)  # the own sidecar's, by transport
    shared: aiohttp.ClientSession | None = None
    shared_after: float = 0.0  # monotonic: when to try the shared Envoy again

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None)
        if self.tcp_port:
            self.sessions["http"] = aiohttp.ClientSession(timeout=timeout)
        if self.uds_path:
            connector = aiohttp.UnixConnector(path=self.uds_path)
            self.sessions["uds"] = aiohttp.ClientSession(connector=connector, timeout=timeout)
        if shared := shared_egress_socket(self.uds_path or ""):
            connector = aiohttp.UnixConnector(path=shared)
            self.shared = aiohttp.ClientSession(connector=connector, timeout=timeout)

    async def post(
        self, transport: str, path: str, body: str, headers: Mapping[str, str]
    ) -> tuple[int, bytes, CIMultiDictProxy[str]]:
        """POST to the host's shared Envoy if it is there, else the own sidecar, which has the same routes.

        What the shared Envoy cannot do goes to the sidecar: a connection it refuses or closes unused, and an
        answer that is its own 503 (marked retriable: the request did not get past it; e.g. the control
        plane just took this runtime's routes off the gateway and a pooled connection still reached them).
        """
        if self.shared is not None and time.monotonic() >= self.shared_after:
            try:
                answer = await _post(self.shared, f"http://shared{path}", body, headers)
                if answer[0] != 503 or h.RETRIABLE not in answer[2]:
                    return answer
            except UNSENT:
                pass
            self.shared_after = time.monotonic() + SHARED_RETRY_S
        return await _post(*self.target(transport, path), body, headers)

    async def close(self) -> None:
        for session in [*self.sessions.values(), *([self.shared] if self.shared else [])]:
            await session.close()

    def target(self, transport: str, path: str) -> tuple[aiohttp.ClientSession, str]:
        session = self.sessions.get(transport) or self.sessions.get("http") or self.sessions.get("uds")
        if session is None:
            raise web.HTTPServiceUnavailable(text=json.dumps({"error": "this runtime has no sidecar to forward to"}))
        if session is self.sessions.get("uds"):
            return session, f"http://sidecar{path}"
        return session, f"http://127.0.0.1:{self.tcp_port}{path}"


async def _post(
    session: aiohttp.ClientSession, url: str, body: str, headers: Mapping[str, str]
) -> tuple[int, bytes, CIMultiDictProxy[str]]:
    async with session.post(url, data=body, headers=headers) as resp:
        return resp.status, await resp.read(), resp.headers
