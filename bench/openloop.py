"""An open-loop load generator: requests sent at a fixed rate, spread evenly over keep-alive connections.

hey's `-q` gives every worker its own ticker, all started together, so 16 workers send in bursts of
16 every 16 ms; single-threaded sidecars then queue the burst and the "latency" measured is mostly
that queue. Here request i is due at start + i / rate, on connection i mod N, so at 1,000/s over 16
connections one request leaves every millisecond. Latency runs from the moment a request is written
to the end of its response, to the microsecond (hey's CSV has 0.1 ms steps). The generator's own cost
is in every path alike, so the difference between two paths is what the extra hops add.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)  # seconds
    statuses: Counter[int] = field(default_factory=Counter)
    late: int = 0  # requests sent more than 1 ms after they were due (the generator fell behind)


async def _connection(host: str, port: int, request: bytes, due: asyncio.Queue[float | None], out: Outcome) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while (when := await due.get()) is not None:
            sent = time.perf_counter()
            out.late += sent - when > 0.001
            writer.write(request)
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            out.latencies.append(time.perf_counter() - sent)
            out.statuses[status] += 1
    finally:
        writer.close()


async def open_loop(url: str, body: bytes, rate: float = 1000, connections: int = 16, seconds: float = 10) -> Outcome:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    out = Outcome()
    queues: list[asyncio.Queue[float | None]] = [asyncio.Queue() for _ in range(connections)]
    tasks = [asyncio.create_task(_connection(host, port, request, q, out)) for q in queues]
    start = time.perf_counter() + 0.1
    for i in range(int(rate * seconds)):
        due = start + i / rate
        if (wait := due - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        queues[i % connections].put_nowait(due)
    for q in queues:
        q.put_nowait(None)
    await asyncio.gather(*tasks)
    return out


def percentiles_ms(out: Outcome, points: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    ordered = sorted(out.latencies)
    return {f"p{q}": ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] * 1000 for q in points}
