"""Payload logging: a sampled record of what a pipeline was asked and answered, as JSON lines.

Opt-in per pipeline (`logging: {percent: P}`): the gateway tells the first
stage's runtime the rate (header x-mll-log), which samples, and once the
pipeline's answer is back writes one line: time, pipeline, version, request id,
status, latency, the models that served it, and the request and response. The
records hold user data: they go to a private folder (0700) of the runtime's.

Bounded: at most MAX_QUEUED records wait for the writer (more are dropped and
counted), each body is cut at MAX_BODY_CHARS, and a file past `max_bytes` is
rotated to `<name>.1`, so a pipeline's log takes at most twice that.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("mllambda.payload_log")
MAX_QUEUED = 1_000
MAX_BODY_CHARS = 64 * 1024
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


def sampled(header: str, rng: Callable[[], float] = random.random) -> bool:
    """Whether this request is logged, from the gateway's x-mll-log (a percentage)."""
    try:
        percent = float(header)
    except ValueError:
        return False
    return 0 < percent <= 100 and rng() * 100 < percent


def body_value(raw: bytes) -> Any:
    """A body as it goes into a record: its JSON when it parses, else text; long ones cut."""
    if len(raw) > MAX_BODY_CHARS:
        return {"truncated": True, "bytes": len(raw), "head": raw[:MAX_BODY_CHARS].decode(errors="replace")}
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


@dataclass
class PayloadLog:
    folder: Path
    max_bytes: int = DEFAULT_MAX_BYTES
    dropped: int = 0
    written: int = 0
    _queue: asyncio.Queue[tuple[str, str]] = field(default_factory=lambda: asyncio.Queue(MAX_QUEUED))
    _task: asyncio.Task[None] | None = None

    def offer(self, pipeline: str, record: dict[str, Any]) -> None:
        """Queue a record for `pipeline`'s file; never waits (a full queue drops it, counted)."""
        try:
            self._queue.put_nowait((pipeline, json.dumps(record, default=str) + "\n"))
        except asyncio.QueueFull:
            self.dropped += 1
            return
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._write_forever())

    async def close(self) -> None:
        """Write what is queued, then stop."""
        if self._task is not None:
            await self._queue.join()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _write_forever(self) -> None:
        while True:
            pipeline, line = await self._queue.get()
            try:
                await asyncio.to_thread(self._append, pipeline, line)
                self.written += 1
            except OSError as err:
                self.dropped += 1
                log.warning("payload log for %s not written: %s", pipeline, err)
            finally:
                self._queue.task_done()

    def _append(self, pipeline: str, line: str) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.folder / f"{pipeline}.jsonl"
        if path.exists() and path.stat().st_size + len(line) > self.max_bytes:
            os.replace(path, path.with_name(path.name + ".1"))
        with open(path, "a", encoding="utf-8") as out:
            out.write(line)


def record(
    pipeline: str, version: str, request_id: str, status: int, started: float, served: str, request: Any, response: Any
) -> dict[str, Any]:
    return {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pipeline": pipeline,
        "version": version,
        "request_id": request_id,
        "status": status,
        "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        "served": [part.strip() for part in served.split(",") if part.strip()],
        "request": request,
        "response": response,
    }
