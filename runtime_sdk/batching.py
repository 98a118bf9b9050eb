"""Adaptive batching: concurrent requests grouped into one `predict_batch(list[dict]) -> list[dict]` call.

A vectorised model (scikit-learn, a network on a matrix) costs about the same
for one row as for dozens, so under load one call per group is far cheaper than
one per request. A batch goes to the model as soon as it holds `max_batch`
requests or its first one has waited `max_wait_ms`; while a batch runs, the
next one fills, so batches grow with the load and stay at one under light load
(no waiting then beyond `max_wait_ms`). One batch runs at a time.

Errors stay per request: an element of the returned list may be an exception
(e.g. `Rejected`) and only that request fails with it; when the whole call
raises, each request of the batch is tried on its own, so one bad input does
not fail the others. The queue is bounded: past `max_queued` waiting requests,
a request is refused at once (`Overloaded`), never held without limit.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

PredictBatch = Callable[[list[dict[str, Any]]], list[Any] | Awaitable[list[Any]]]


class Overloaded(Exception):
    """More requests are waiting for a batch than the runtime will hold."""


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int
    max_wait_ms: float = 5.0
    max_queued: int = 0  # 0: 8 batches' worth

    @property
    def queue_limit(self) -> int:
        return self.max_queued or 8 * self.max_batch


class Batcher:
    def __init__(
        self,
        predict_batch: PredictBatch,
        policy: BatchPolicy,
        observe_size: Callable[[float], None] = lambda n: None,
        observe_seconds: Callable[[float], None] = lambda s: None,
    ) -> None:
        self.predict_batch = predict_batch
        self.policy = policy
        self.observe_size = observe_size
        self.observe_seconds = observe_seconds
        self.is_async = inspect.iscoroutinefunction(predict_batch)
        self._queue: deque[tuple[dict[str, Any], asyncio.Future[dict[str, Any]], float]] = deque()
        self._waiting = asyncio.Event()  # something is queued
        self._full = asyncio.Event()  # a whole batch is queued
        self._task: asyncio.Task[None] | None = None

    async def submit(self, payload: dict[str, Any]) -> Any:
        """The model's answer for `payload`, computed in some batch."""
        if len(self._queue) >= self.policy.queue_limit:
            raise Overloaded(f"{len(self._queue)} requests already wait for a batch")
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._queue.append((payload, future, loop.time()))
        self._waiting.set()
        if len(self._queue) >= self.policy.max_batch:
            self._full.set()
        return await future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self._waiting.wait()
            # The oldest request waits at most max_wait_ms in all (including while the last batch ran).
            left = self.policy.max_wait_ms / 1000 - (asyncio.get_running_loop().time() - self._queue[0][2])
            if len(self._queue) < self.policy.max_batch and left > 0:
                try:
                    await asyncio.wait_for(self._full.wait(), left)
                except TimeoutError:
                    pass
            taken = [self._queue.popleft() for _ in range(min(self.policy.max_batch, len(self._queue)))]
            if len(self._queue) < self.policy.max_batch:
                self._full.clear()
            if not self._queue:
                self._waiting.clear()
            batch = [(payload, future) for payload, future, _ in taken if not future.done()]  # callers gone
            if batch:
                await self._answer(batch)

    async def _answer(self, batch: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]]) -> None:
        self.observe_size(len(batch))
        try:
            answers = await self._call([payload for payload, _ in batch])
        except Exception as err:
            if len(batch) == 1:
                _settle(batch[0][1], err)
                return
            for one in batch:  # find the request that broke the call: each on its own
                await self._answer([one])
            return
        for (_, future), answer in zip(batch, answers, strict=True):
            _settle(future, answer)

    async def _call(self, payloads: list[dict[str, Any]]) -> list[Any]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            if self.is_async:
                answers = await self.predict_batch(payloads)  # type: ignore[misc]
            else:  # the model's CPU work stays off the event loop
                answers = await asyncio.to_thread(self.predict_batch, payloads)
        finally:
            self.observe_seconds(loop.time() - started)
        if not isinstance(answers, list) or len(answers) != len(payloads):
            got = f"{len(answers)} answers" if isinstance(answers, list) else type(answers).__name__
            raise TypeError(f"predict_batch() returned {got} for {len(payloads)} requests; expected a list, one each")
        return answers


def _settle(future: asyncio.Future[dict[str, Any]], answer: Any) -> None:
    if future.done():
        return
    if isinstance(answer, BaseException):
        future.set_exception(answer)
    else:
        future.set_result(answer)
