"""How a runtime sends its output on: to its own sidecar's egress, or to the host's shared Envoy."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from contract import headers as h
from contract.service import shared_egress_socket
from runtime_sdk.hop import Answer, HopClient, HopError, Unsent

SHARED_RETRY_S = 1.0  # the host's shared Envoy refused: the own sidecar forwards for this long, then try again


class NoSidecar(HopError):
    """This runtime was started without a sidecar to forward to."""


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
    sidecar: dict[str, HopClient] = field(default_factory=dict)  # the own sidecar's listeners, by transport
    shared: HopClient | None = None
    shared_after: float = 0.0  # monotonic: when to try the shared Envoy again

    async def start(self) -> None:
        if self.tcp_port:
            self.sidecar["http"] = HopClient(port=self.tcp_port)
        if self.uds_path:
            self.sidecar["uds"] = HopClient(path=self.uds_path)
        if shared := shared_egress_socket(self.uds_path or ""):
            self.shared = HopClient(path=shared, host="shared")

    async def post(self, transport: str, path: str, body: str | bytes, headers: Mapping[str, str]) -> Answer:
        """POST to the host's shared Envoy if it is there, else the own sidecar, which has the same routes.

        What the shared Envoy cannot do goes to the sidecar: a connection it refuses or closes unused, and an
        answer that is its own 503 (marked retriable: the request did not get past it; e.g. the control
        plane just took this runtime's routes off the gateway and a pooled connection still reached them).
        Raises HopError when the sidecar gives no answer either.
        """
        if self.shared is not None and time.monotonic() >= self.shared_after:
            try:
                answer = await self.shared.post(path, body, headers)
                if answer.status != 503 or h.RETRIABLE not in answer.headers:
                    return answer
            except Unsent:
                pass
            self.shared_after = time.monotonic() + SHARED_RETRY_S
        return await self._sidecar(transport).post(path, body, headers)

    async def close(self) -> None:
        for client in [*self.sidecar.values(), *([self.shared] if self.shared else [])]:
            await client.close()

    def _sidecar(self, transport: str) -> HopClient:
        client = self.sidecar.get(transport) or self.sidecar.get("http") or self.sidecar.get("uds")
        if client is None:
            raise NoSidecar("this runtime has no sidecar to forward to")
        return client
