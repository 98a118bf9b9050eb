"""The two loops every component runs against Consul, written once.

`watch` follows one blocking query forever, as Consul's guidance for blocking
queries says: pass the last index back, start over from 0 when it goes
backwards, back off with jitter on errors and never poll tightly. A failed
query keeps the last answer in force (the caller never sees an empty one
because Consul was away).

`keep_registered` is agent anti-entropy: a service the agent forgot (restarted,
wiped) is registered again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("mllambda.watch")
WAIT = "30s"  # how long Consul holds a blocking query open


class Backoff:
    """Full jitter, doubling from `first` up to `cap` seconds; reset on success."""

    def __init__(self, first: float = 0.2, cap: float = 10.0) -> None:
        self.first, self.cap, self.failures = first, cap, 0

    def next_delay(self) -> float:
        self.failures += 1
        return random.uniform(0, min(self.cap, self.first * 2**self.failures))

    def reset(self) -> None:
        self.failures = 0


def next_index(previous: int, returned: Any) -> int:
    """Consul: if the index goes backwards, start over from 0."""
    try:
        index = int(returned or 0)
    except (TypeError, ValueError):
        return 0
    return 0 if index < previous else index


Query = Callable[[int | None], Awaitable[tuple[Any, T]]]  # index (None: don't block) -> (new index, answer)


async def watch(
    query: Query[T],
    take: Callable[[T], Awaitable[None] | None],
    *,
    what: str,
    on_error: Callable[[str, Exception], None] | None = None,
    on_success: Callable[[], None] | None = None,
    spacing: Callable[[], float] | None = None,
) -> None:
    """Call `take` with every answer of a blocking query, forever (until cancelled).

    An exception from `take` is logged and the watch goes on: one bad answer
    does not end it. `spacing` says how long to wait before the next query
    (Consul's advice for watches whose answers are large and change often:
    changes in between are read together).
    """
    index, backoff = 0, Backoff()
    while True:
        if spacing is not None and index:
            await asyncio.sleep(spacing())
        try:
            returned, answer = await query(index or None)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if on_error is not None:
                on_error(what, err)
            else:
                log.warning("watch %s failed: %s", what, err)
            await asyncio.sleep(backoff.next_delay())
            continue
        backoff.reset()
        if on_success is not None:
            on_success()
        index = next_index(index, returned)
        try:
            outcome = take(answer)
            if outcome is not None:
                await outcome
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("watch %s: handling an answer failed; keeping the last good state", what)
            await asyncio.sleep(backoff.next_delay())


async def keep_registered(
    is_registered: Callable[[], Awaitable[bool]], register_again: Callable[[], Awaitable[None]], what: str
) -> None:
    """Every 2 s: if the agent forgot the service, register it again. Consul away: try next round."""
    while True:
        await asyncio.sleep(2)
        try:
            if not await is_registered():
                await register_again()
                log.info("re-registered %s", what)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.debug("registration check of %s failed: %s", what, err)
