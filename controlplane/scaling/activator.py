"""Scale to zero: while a model version has no replica, its requests are held here, not failed.

For every policy with `min_replicas: 0` the control plane listens on a loopback
port of its own. While the version has no passing replica, that port is the
only endpoint of the version's cluster in every Envoy (plaintext: it is on the
control plane's host), so a request for it arrives here and counts as in flight
in the caller's Envoy; the autoscaler sees that and asks for a replica at once.
Once one passes its checks (and EDS has had time to carry it), the held request
is answered 503 with the header that tells the caller's Envoy to retry the hop
(`x-mll-retriable`, already in every stage's retry policy); the retry goes to
the new replica. No replica within MAX_HOLD: 503 without it, which the caller
returns.

Bounded: at most MAX_HELD requests wait per version; more are refused at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from aiohttp import web

from contract import headers as h
from controlplane.scaling.policy import Policy

log = logging.getLogger("mllambda.activator")
MAX_HELD = 1000  # requests waiting per version
MAX_HOLD = 120.0  # seconds a request waits for a replica (the stage timeout usually ends it first)
SETTLE = 0.5  # seconds after a replica passes before the retry is asked for: EDS carries it meanwhile
POLL = 0.05


class Activator:
    def __init__(self, policies: Sequence[Policy], passing: Callable[[], Mapping[str, int]]) -> None:
        self.policies = [p for p in policies if p.min_replicas == 0]
        self.passing = passing  # replicas passing now, per cluster
        self.ports: dict[str, int] = {}  # cluster -> where it is held
        self.held: dict[str, int] = {}  # cluster -> requests waiting now
        self.cold_starts: dict[str, float] = {}  # cluster -> seconds the last first request waited
        self._runners: list[web.AppRunner] = []
        self._seen: tuple[float, dict[str, bool]] = (0.0, {})  # one look at the fleet per POLL, however many wait

    def _ready(self, cluster: str) -> bool:
        at, ready = self._seen
        if time.monotonic() - at >= POLL:
            counts = self.passing()
            ready = {c: counts.get(c, 0) > 0 for c in self.ports}
            self._seen = (time.monotonic(), ready)
        return ready.get(cluster, False)

    async def start(self) -> None:
        for policy in self.policies:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handler(policy.cluster))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self.ports[policy.cluster] = runner.addresses[0][1]
            self._runners.append(runner)

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()

    def parked(self) -> tuple[tuple[str, str, int], ...]:
        """(cluster, host, port) of every scaled-to-zero version with no passing replica now."""
        counts = self.passing()
        return tuple((c, "127.0.0.1", port) for c, port in sorted(self.ports.items()) if counts.get(c, 0) == 0)

    def _handler(self, cluster: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def hold(request: web.Request) -> web.StreamResponse:
            if self.held.get(cluster, 0) >= MAX_HELD:
                return web.Response(status=503, text=f"{cluster}: {MAX_HELD} requests already wait for a replica")
            self.held[cluster] = self.held.get(cluster, 0) + 1
            started, cold = time.monotonic(), not self._ready(cluster)
            try:
                while not self._ready(cluster):
                    if time.monotonic() - started > MAX_HOLD:
                        return web.Response(status=503, text=f"no replica of {cluster} was ready in {MAX_HOLD:g} s")
                    await asyncio.sleep(POLL)
                await asyncio.sleep(SETTLE)
            finally:
                self.held[cluster] -= 1
            if cold:  # not one that came in while EDS was still catching up
                self.cold_starts[cluster] = time.monotonic() - started
                log.info(
                    "cluster=%s cold start: held %.2f s until a replica passed", cluster, self.cold_starts[cluster]
                )
            return web.Response(status=503, text="a replica is ready: retry", headers={h.RETRIABLE: "1"})

        return hold
