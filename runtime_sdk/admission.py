"""Admission at a runtime: at most `slots` requests in predict, priorities between pipelines, fair shares
between callers (docs/architecture.md, "Flow control").

The gateway tells each request its pipeline's priority (a number: above 0 more important than standard, 0
standard, below 0 sheddable) and its caller's key (a header the pipeline names, or the client's address);
both travel with the request through every stage. While a place in predict is free and nobody waits, a
request goes in at once. Otherwise:
- a sheddable request is refused at once: 503 with `retry-after`, never retried on another replica;
- a caller that holds its share of the places (in predict or waiting: slots + queue, split between the
  callers present by their weights, 1 unless the pipeline weighs its key) or more, while others are here, is
  refused at once: 429 with `retry-after`;
- anyone else waits, for at most `max_wait` seconds (then a retriable 503), in one of `queue` places; when
  they are all taken, the newest waiter of a lower priority, or of a caller over its share, gives its place
  up (it is refused as above); without such a waiter the newcomer is a retriable 503 at once.
A freed place goes to the highest priority waiting, to the caller with the fewest requests in predict for its
weight, then the one served least lately (round robin between callers always here; one that comes and goes
counts as never served), oldest first per caller.
With `queue` 0 nothing waits: beyond `slots` a request is refused at once (sheddable, over share, or the
retriable 503 that lets the hop before try another replica). Bounded: the callers tracked are those with a
request here (at most slots + queue), a key is cut to KEY_CHARS, a weight is 1 to MAX_WEIGHT; a caller keeps
the weight it came with while it has a request here.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

from contract.headers import PRIORITIES

KEY_CHARS = 64
MAX_WEIGHT = 100  # a caller's weight in fair shares (contract.headers.SHARE)
MAX_WAIT = 0.5  # seconds a request may wait for a place
RETRY_AFTER = 1  # seconds, in a refusal's retry-after


@dataclass
class Refused(Exception):
    """Not admitted: the answer to give (status, the reason, and whether another replica may take it)."""

    status: int
    reason: str
    retriable: bool = False
    shed: str = "saturated"  # the outcome counted: "shed", "over share", "saturated", "waited too long"

    def __str__(self) -> str:
        return self.reason


def priority_of(value: str | None) -> int:
    """A priority header's value as a number (a name or an integer); standard when absent or unreadable."""
    if not value:
        return 0
    if value in PRIORITIES:
        return PRIORITIES[value]
    try:
        return max(-1000, min(1000, int(value)))
    except ValueError:
        return 0


def weight_of(value: str | None) -> int:
    """A share header's value: a whole number 1..MAX_WEIGHT; 1 when absent or unreadable."""
    try:
        return max(1, min(MAX_WEIGHT, int(value or 1)))
    except ValueError:
        return 1


def band(priority: int) -> str:
    """A priority's name in metrics: three values, whatever number a pipeline chose."""
    return "critical" if priority > 0 else "sheddable" if priority < 0 else "standard"


class Admission:
    def __init__(self, slots: int, queue: int = 0, max_wait: float = MAX_WAIT) -> None:
        self.slots, self.queue, self.max_wait = slots, queue, max_wait
        self.in_flight = 0
        self.places: Counter[str] = Counter()  # caller -> its requests here, in predict or waiting
        self.waiting: dict[int, OrderedDict[str, deque[asyncio.Future[None]]]] = {}  # priority -> caller -> FIFO
        self.n_waiting = 0
        self.served: dict[str, int] = {}  # caller -> the turn its last waiter was given a place (callers here)
        self.weights: dict[str, int] = {}  # caller -> its weight (callers here)
        self.total_weight = 0  # of the callers here
        self._turn = 0

    def share(self, key: str, weight: int = 1) -> int:
        """The places a caller may hold: all of them split between the callers here (it included, with `weight`
        if it is new) by their weights."""
        return self._share(self.weights.get(key, weight), self._total_with(key, weight))

    def _total_with(self, key: str, weight: int) -> int:
        return self.total_weight + (0 if key in self.places else weight)

    def _share(self, weight: int, total: int) -> int:
        return max(1, (self.slots + self.queue) * weight // total)

    async def enter(self, key: str, priority: int, weight: int = 1) -> None:
        """Return once admitted into predict (then call leave(key)); Refused otherwise."""
        key = key[:KEY_CHARS]
        if self.in_flight < self.slots and not self.n_waiting:
            self.in_flight += 1
            self._place(key, weight)
            self._turn += 1
            self.served[key] = self._turn
            return
        busy = f"{self.in_flight} requests in predict (of {self.slots}), {self.n_waiting} waiting (of {self.queue})"
        if priority < 0:
            raise Refused(503, f"saturated: {busy}; sheddable requests are refused first", shed="shed")
        held, share = self.places[key], self.share(key, weight)
        if held >= share and len(self.places) > 1:  # alone, a caller is over nobody's share: saturated (below)
            weighed = f", weight {self.weights.get(key, weight)}" if self.total_weight != len(self.places) else ""
            raise Refused(
                429,
                f"caller {key!r} holds {held} of the {self.slots + self.queue} places, its fair share is {share}"
                f"{weighed} ({busy})",
                shed="over share",
            )
        if self.n_waiting >= self.queue and not self._give_up_a_place(priority, key, weight):
            raise Refused(503, f"saturated: {busy}", retriable=True)
        future = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(priority, OrderedDict()).setdefault(key, deque()).append(future)
        self.n_waiting += 1
        self._place(key, weight)
        try:
            await asyncio.wait_for(asyncio.shield(future), self.max_wait)
        except TimeoutError:
            if future.done() and not future.exception():
                return  # given a place as the wait ran out: admitted
            self._forget(key, priority, future)
            raise Refused(503, f"waited {self.max_wait:g} s for a place: {busy}", True, "waited too long") from None
        except asyncio.CancelledError:  # the caller hung up while it waited
            if future.done() and not future.exception():
                self.leave(key)  # admitted at the moment it went: the place goes on
            else:
                self._forget(key, priority, future)
            raise

    def leave(self, key: str) -> None:
        """A request admitted with `key` is done with predict: its place goes to the next waiting."""
        key = key[:KEY_CHARS]
        self.in_flight -= 1
        self._release(key)
        while self.in_flight < self.slots and self.n_waiting:
            top = max(self.waiting)
            callers = self.waiting[top]
            # the caller with the fewest in predict for its weight, then the one served least lately (a caller
            # that comes and goes, as a light one does, counts as never served)
            caller = min(
                callers, key=lambda c: ((self.places[c] - len(callers[c])) / self.weights[c], self.served.get(c, -1))
            )
            future = callers[caller].popleft()
            self._turn += 1
            self.served[caller] = self._turn
            self._tidy(top, caller)
            self.n_waiting -= 1
            self.in_flight += 1
            future.set_result(None)

    def _give_up_a_place(self, priority: int, key: str, weight: int) -> bool:
        """Every waiting place is taken: the newest waiter of a lower priority, else of the caller most over its
        share (the shares with the newcomer `key` counted, at its priority), is refused to make room. False:
        nobody should give way."""
        lower = [p for p in self.waiting if p < priority]
        if lower:
            p = min(lower)
            caller = max(self.waiting[p], key=lambda c: self.places[c])
            why = "saturated: a request of a higher priority took the place"
            self._refuse_newest(p, caller, Refused(503, why, retriable=True, shed="shed"))
            return True
        total = self._total_with(key, weight)
        shares = {c: self._share(self.weights[c], total) for c in self.waiting.get(priority, ())}
        over = [c for c, share in shares.items() if self.places[c] > share]
        if not over:
            return False
        caller = max(over, key=lambda c: self.places[c] / self.weights[c])
        why = f"caller {caller!r} is over its fair share ({self.places[caller]} places, its share is {shares[caller]})"
        self._refuse_newest(priority, caller, Refused(429, why, shed="over share"))
        return True

    def _refuse_newest(self, priority: int, caller: str, why: Refused) -> None:
        future = self.waiting[priority][caller].pop()
        self._tidy(priority, caller)
        self.n_waiting -= 1
        self._release(caller)
        future.set_exception(why)

    def _forget(self, key: str, priority: int, future: asyncio.Future[None]) -> None:
        """A waiter that went (timed out, hung up) before it got a place; refused ones are gone already."""
        queue = self.waiting[priority].get(key) if priority in self.waiting else None
        if queue is not None and future in queue:
            queue.remove(future)
            self._tidy(priority, key)
            self.n_waiting -= 1
            self._release(key)

    def _tidy(self, priority: int, caller: str) -> None:
        if not self.waiting[priority][caller]:
            del self.waiting[priority][caller]
            if not self.waiting[priority]:
                del self.waiting[priority]

    def _place(self, key: str, weight: int) -> None:
        if key not in self.places:
            self.weights[key] = weight
            self.total_weight += weight
        self.places[key] += 1

    def _release(self, key: str) -> None:
        self.places[key] -= 1
        if self.places[key] <= 0:
            del self.places[key]
            self.served.pop(key, None)
            self.total_weight -= self.weights.pop(key)
