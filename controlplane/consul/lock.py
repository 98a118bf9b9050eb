"""Consul sessions of the shortest TTL, and one holder at a time among several control planes: a session
lock on one KV key.

A session lives while its owner renews it every few seconds; an owner that dies or is cut off loses
it within about twice the TTL, and with it what it holds: a lock key (`release` behaviour; `lock_delay=0`
lets the next holder take it at once) or a record (`delete`, controlplane/delivery/peer_acks.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import consul.aio

SESSION_TTL = 10  # seconds; Consul's minimum
RENEW_EVERY = 3.0


class Session:
    """One Consul session, created when first needed and renewed when due by `current`."""

    def __init__(self, client: consul.aio.Consul, name: str, behavior: str) -> None:
        self.client, self.name, self.behavior = client, name, behavior
        self.id = ""
        self._renewed = 0.0

    async def current(self) -> str | None:
        """The session's id (a new one if there is none); None if Consul says it expired (the next call makes one)."""
        if not self.id:
            self.id = await self.client.session.create(
                name=self.name, ttl=SESSION_TTL, behavior=self.behavior, lock_delay=0
            )
            self._renewed = time.monotonic()
        elif time.monotonic() - self._renewed > RENEW_EVERY:
            if await self.client.session.renew(self.id) is None:
                self.id = ""
                return None
            self._renewed = time.monotonic()
        return self.id

    def forget(self) -> None:
        self.id = ""

    async def destroy(self) -> None:
        """End it now (what it holds goes with it); if Consul is away, its TTL does that."""
        if self.id:
            try:
                await self.client.session.destroy(self.id)
            finally:
                self.id = ""


class SessionLock:
    def __init__(self, client: consul.aio.Consul, key: str, holder: str, what: str) -> None:
        self.client = client
        self.key = key
        self.holder = holder  # written into the key: who holds it
        self.what = what  # "rollout driver", "autoscaler": in logs
        self.holding = False
        self.taken = 0.0  # monotonic time this holder last took the lock
        self.session = Session(client, f"mllambda-{what.replace(' ', '-')}", "release")
        self.log = logging.getLogger(f"mllambda.{what.split()[0]}")

    async def hold(self) -> bool:
        """Renew the session, or take the lock if it is free; True while this process holds it."""
        session = await self.session.current()
        if session is None:
            self.lost()
            return False
        if not self.holding:
            self.holding = bool(await self.client.kv.put(self.key, self.holder, acquire=session))
            if self.holding:
                self.taken = time.monotonic()
                self.log.info("%s: this control plane holds the lock (%s)", self.what, self.holder)
        return self.holding

    def lost(self) -> None:
        if self.holding:
            self.log.warning("%s: lost the lock", self.what)
        self.holding = False
        self.session.forget()

    async def release(self) -> None:
        try:
            await self.session.destroy()
        except Exception:  # going away anyway; the TTL frees it
            pass
        self.holding = False


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
