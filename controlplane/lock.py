"""One holder at a time among several control planes: a Consul session lock on one KV key.

The session has Consul's shortest TTL and `release` behaviour, so a holder that
dies frees the key within about twice the TTL, and `lock_delay=0` lets the next
one take it at once. The holder renews it every few seconds while it works.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import consul.aio

SESSION_TTL = 10  # seconds; Consul's minimum
RENEW_EVERY = 3.0


class SessionLock:
    def __init__(self, client: consul.aio.Consul, key: str, holder: str, what: str) -> None:
        self.client = client
        self.key = key
        self.holder = holder  # written into the key: who holds it
        self.what = what  # "rollout driver", "autoscaler": in logs
        self.holding = False
        self.taken = 0.0  # monotonic time this holder last took the lock
        self._session = ""
        self._renewed = 0.0
        self.log = logging.getLogger(f"mllambda.{what.split()[0]}")

    async def hold(self) -> bool:
        """Renew the session, or take the lock if it is free; True while this process holds it."""
        if not self._session:
            self._session = await self.client.session.create(
                name=f"mllambda-{self.what.replace(' ', '-')}", ttl=SESSION_TTL, behavior="release", lock_delay=0
            )
            self._renewed = time.monotonic()
        elif time.monotonic() - self._renewed > RENEW_EVERY:
            if await self.client.session.renew(self._session) is None:
                self.lost()
                return False
            self._renewed = time.monotonic()
        if not self.holding:
            self.holding = bool(await self.client.kv.put(self.key, self.holder, acquire=self._session))
            if self.holding:
                self.taken = time.monotonic()
                self.log.info("%s: this control plane holds the lock (%s)", self.what, self.holder)
        return self.holding

    def lost(self) -> None:
        if self.holding:
            self.log.warning("%s: lost the lock", self.what)
        self.holding, self._session = False, ""

    async def release(self) -> None:
        if self._session:
            try:
                await self.client.session.destroy(self._session)
            except Exception:  # going away anyway; the TTL frees it
                pass
        self.holding, self._session = False, ""


async def lead(lock: SessionLock, step: Callable[[bool], Awaitable[float]]) -> None:
    """Forever: hold the lock (or wait for it); `step(holding)` does one round and says how long to rest.

    Whatever fails (Consul away, a write refused) is logged and tried again; nothing stops this but a cancel,
    which gives the lock back at once.
    """
    while True:
        try:
            await asyncio.sleep(await step(await lock.hold()))
        except asyncio.CancelledError:
            await lock.release()
            raise
        except Exception as err:
            lock.log.warning("%s: %s", lock.what, err)
            lock.lost()
            await asyncio.sleep(1.0)
