"""The runtime's HTTP/1.1 server, for the few peers that call it: its sidecar or the host's shared Envoy,
Consul's checks, Prometheus, a test.

aiohttp's web server spent ~50 us of CPU per request on a stage (router, middlewares, its Request and
Response objects), as much as the rest of the stage's own work; this one spends ~11 (bench.wire_server;
docs/benchmarks.md, "What was tried for a cheaper hop"), the server-side counterpart of hop.py. It reads a
request's body whole (by Content-Length or chunks), keeps connections alive, and answers the requests of
one connection in order.

Bounds: a request head of MAX_HEAD bytes (431 and the connection closed), a body of `max_body` bytes, or
fewer when its pipeline's limit comes with it (x-mll-max-body, set by the sidecar; 413, closed),
MAX_QUEUED requests read ahead on one connection (then it stops reading), `max_connections` open connections:
one more closes the connection idle longest (or one whose request stopped arriving STALLED seconds ago, with a
408), or is reset if there is none (its caller, an Envoy, retries a reset elsewhere). A connection idle for
IDLE_SECONDS is closed (its sidecar closes its own after 60 s, before this can race a request).
Each refusal is told to `refused` ("400", "408", "413", "431", "connections") for the runtime's metrics.
A caller that closes its connection (FIN or reset: Envoy aborts an upstream request by closing, as a
half-close looks the same) cancels what it asked: no more model time or next hop for an unread answer.
A request line, header line, length or chunk that llhttp (hop.read_head, take_chunked) does not read as
HTTP/1.1 is a 400 with its reason and the connection is closed:
after a framing error the next request's start is unknown. Both a length and chunks (smuggling) is a 400.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

from runtime_sdk.hop import Pieces, TooLarge, TooManyFields, take_buffered, take_chunked
from runtime_sdk.http1 import (
    BadRequest,
    Head,
    HttpError,
    Request,
    Response,
    body_length,
    body_limit,
    json_response,
    parse_head,
    response_bytes,
)

MAX_HEAD = 64 * 1024
MAX_QUEUED = 16
MAX_CONNECTIONS = 1024  # as Envoy's default circuit breaker allows towards one host
BODY_BUDGET = 128 * 1024 * 1024  # bytes of request bodies held at once (read, waiting or being answered)
WARN_EVERY = 10.0  # seconds between warnings of refused connections
STALLED = 10.0  # seconds without a byte of a request begun: its connection may be closed for a new one
log = logging.getLogger("mllambda.runtime")


Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class _Reading:
    """A request whose head is in and whose body is not yet."""

    head: Head  # its headers in head.message; chunked, its body goes through head.parser into head.message
    close: bool  # after its answer
    length: int | None  # None: chunked
    limit: int  # bytes its body may have: the server's max_body, or less if its pipeline says so
    pieces: Pieces | None = None  # by length
    continued: bool = False  # "100 Continue" sent

    def __post_init__(self) -> None:
        if self.length is not None:
            self.pieces = Pieces(self.length)

    @property
    def headers(self) -> CIMultiDict[str]:
        return self.head.message.headers

    def request(self) -> Request:
        head = self.head
        body = bytes(head.message.body) if self.pieces is None else self.pieces.join()
        return Request(head.method, head.path, head.query, CIMultiDictProxy(head.message.headers), body)


IDLE_SECONDS = 300.0  # a keep-alive connection with nothing read or answered that long is closed (sidecars: 60)
LINGER = 2.0  # seconds a refused request's rest is read and dropped before the connection closes
LINGER_BYTES = 128 * 1024 * 1024


class _Connection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.buffer = bytearray()
        # (request or what was wrong, close after it, bytes of the body budget it holds)
        self.queue: deque[tuple[Request | BadRequest, bool, int]] = deque()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.closing = False  # no more requests are read (an error, Connection: close, the server stops)
        self.paused = False
        self.searched = 0  # where the search for the head's end goes on from
        self.reading: _Reading | None = None
        self.held = 0  # bytes of the server's body budget this connection holds (its requests by length)
        self.wants = 0  # bytes it waits for (its next body's length; blocked until the budget has them)
        self.quiet_since = time.monotonic()  # the last byte in or answer out
        self.dropped = 0  # bytes read and dropped after a refusal (_linger)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self.server.room():
            self.closing = True
            transport.abort()
            return
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.closing, self.transport = True, None
        self.queue.clear()
        self._let_go()
        if self.task is not None:  # its caller is gone: no more model time or next hop for an answer nobody reads
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            self.dropped += len(data)
            if self.dropped > LINGER_BYTES and self.transport is not None:
                self.transport.close()
            return
        self.quiet_since = time.monotonic()
        reading = self.reading
        if reading is not None and reading.pieces is not None and not self.buffer and not self.wants:
            data = reading.pieces.take(data)  # a body by length arriving, nothing before it unread
            if not reading.pieces.complete:
                return
        self.buffer += data
        self._take()

    def _take(self) -> None:
        """Read the requests the buffer holds, up to MAX_QUEUED waiting; stop reading the socket while full."""
        try:
            self._parse()
        except BadRequest as bad:
            self.closing = True
            self.queue.append((bad, True, 0))
        if self.queue and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._answer())
        full = len(self.queue) >= MAX_QUEUED or self.wants > 0
        if full != self.paused and self.transport is not None:
            self.paused = full
            if full:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _parse(self) -> None:
        while not self.closing and len(self.queue) < MAX_QUEUED and not self.wants:
            if self.reading is None:
                self.reading = self._head()
                if self.reading is None:
                    return
                if self.reading.length and not self.server.reserve(self, self.reading.length):
                    self.wants = self.reading.length  # its body stays unread (with the sender) until there is room
                    return
                self.held += self.reading.length or 0
            reading = self.reading
            if not self._body(reading):
                if not reading.continued and reading.headers.get("expect", "").lower() == "100-continue":
                    reading.continued = True
                    if self.transport is not None:
                        self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # the client waits for it
                return
            self.reading = None
            self.queue.append((reading.request(), reading.close, reading.length or 0))
            self.closing = reading.close

    def _head(self) -> _Reading | None:
        """The next request's head, taken out of the buffer (None: not all here yet)."""
        end = self.buffer.find(b"\r\n\r\n", self.searched)
        if end > MAX_HEAD or (end < 0 and len(self.buffer) > MAX_HEAD):
            raise BadRequest(431, f"request head over {MAX_HEAD} bytes")
        if end < 0:
            self.searched = max(0, len(self.buffer) - 3)
            return None
        head = parse_head(bytes(self.buffer[: end + 4]))
        headers, http10 = head.message.headers, head.http10
        if http10 and "transfer-encoding" in headers:  # framing HTTP/1.0 does not have: a smuggling pattern
            raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
        limit = head.message.limit = body_limit(headers, self.server.max_body)
        length = body_length(headers, limit)
        if not http10 and len(headers.getall("host", [])) != 1:  # RFC 9112, 3.2: a 400, as h11 and Envoy do
            raise BadRequest(400, "an HTTP/1.1 request needs one Host header")
        del self.buffer[: end + 4]
        self.searched = 0
        connection = headers.get("connection", "").lower()
        close = connection == "close" or (http10 and connection != "keep-alive") or self.server.stopping
        return _Reading(head, close, length, limit)

    def _body(self, reading: _Reading) -> bool:
        """Move what has come of the body out of the buffer; True once it is all in."""
        if reading.length is None:
            try:
                return take_chunked(reading.head.parser, reading.head.message, self.buffer)
            except TooLarge as err:
                raise BadRequest(413, f"body too large: the limit is {reading.limit} bytes ({err})") from None
            except TooManyFields as err:
                raise BadRequest(431, f"trailers: {err}") from None
            except ValueError as err:
                raise BadRequest(400, f"a malformed chunked body: {err}") from None
        assert reading.pieces is not None
        return take_buffered(self.buffer, reading.pieces)

    async def _answer(self) -> None:
        try:
            while self.queue and self.transport is not None:
                request, close, size = self.queue.popleft()
                if self.paused:
                    self._take()  # what waited in the buffer, and the socket again
                response = await self._respond(request)
                if self.transport is None:
                    return
                close = close or self.server.stopping
                head = not isinstance(request, BadRequest) and request.method == "HEAD"
                for part in response_bytes(response, close, head):  # (3.11's writelines would join them)
                    self.transport.write(part)
                self.held -= size  # answered: its body is done with
                self.server.release(size)
                if close:
                    if isinstance(request, BadRequest):
                        self._linger(self.transport)
                    else:
                        self.transport.close()
                    return
        finally:
            self.task = None
            self.quiet_since = time.monotonic()

    async def _respond(self, request: Request | BadRequest) -> Response:
        if isinstance(request, BadRequest):
            self.server.refused(str(request.status))
            return json_response({"error": str(request)}, request.status)
        started = time.perf_counter()
        try:
            response = await self.server.handler(request)
        except HttpError as err:
            response = err.response
        except Exception:
            log.exception("handling %s %s failed", request.method, request.path[:200])
            response = json_response({"error": "the runtime failed to answer (see its log)"}, 500)
        except asyncio.CancelledError:
            self._logged(request, 499, 0, started)  # nginx's "client closed request"
            raise
        self._logged(request, response.status, len(response.body), started)
        return response

    def _logged(self, request: Request, status: int, size: int, started: float) -> None:
        if self.server.access_log is not None:
            took = (time.perf_counter() - started) * 1000
            self.server.access_log.info('"%s %s" %d %d %.2fms', request.method, request.path[:200], status, size, took)

    def _linger(self, transport: asyncio.Transport) -> None:
        """After a refusal, close as well-behaved servers do: our answer is sent, then a FIN; what the peer
        still sends of the refused request is read and dropped (LINGER seconds, LINGER_BYTES at most), then the
        connection closes. Closed with those bytes unread, the kernel would reset it, and the peer (an Envoy)
        would drop our answer for a 503 of its own (issue 41)."""
        if transport.can_write_eof():
            transport.write_eof()
        self._let_go()
        if self.paused:
            self.paused = False
            transport.resume_reading()
        self.buffer.clear()
        self.reading = None
        asyncio.get_running_loop().call_later(LINGER, transport.close)

    def unblock(self) -> None:
        """The body budget has room for the body this connection waits to read: read on."""
        self.held, self.wants = self.held + self.wants, 0
        if self.transport is not None:
            self._take()

    def _let_go(self) -> None:
        """Give back what this connection holds of the body budget, and its place among those waiting."""
        if self.wants:
            self.server.waiting.remove(self)
            self.wants = 0
        held, self.held = self.held, 0
        self.server.release(held)

    def partial(self) -> bool:
        return self.reading is not None or bool(self.buffer)

    def _unanswered(self) -> bool:
        """Open, with nothing being answered."""
        return self.transport is not None and self.task is None and not self.queue

    def idle(self) -> bool:
        """Open, with nothing being read or answered."""
        return self._unanswered() and not self.partial()

    def sheddable(self, now: float) -> bool:
        """Idle, or a request began and nothing came for STALLED seconds (nothing is being answered). One whose
        body waits for the body budget is not: it is this server, not its sender, that does not read on."""
        stalled = now - self.quiet_since >= STALLED and not self.wants
        return self._unanswered() and (not self.partial() or stalled)

    def shed(self) -> None:
        """Close it for a new connection: a request it had begun gets a 408."""
        if self.transport is not None:
            if self.partial():
                error = {"error": f"request incomplete after {STALLED:g} s without a byte, with no room to wait"}
                self.transport.write(b"".join(response_bytes(json_response(error, 408), close=True)))
                self.server.refused("408")
            self.closing = True
            self.transport.close()

    def close_if_idle(self) -> None:
        if self.idle() and self.transport is not None:
            self.transport.close()


class Server:
    """One handler behind any number of listening sockets; `stop` lets what is in flight finish."""

    def __init__(
        self,
        handler: Handler,
        max_body: int,
        access_log: logging.Logger | None = None,
        max_connections: int = MAX_CONNECTIONS,
        refused: Callable[[str], None] = lambda what: None,
        idle_seconds: float = IDLE_SECONDS,
        body_budget: int = BODY_BUDGET,
    ) -> None:
        self.handler = handler
        self.body_budget = body_budget
        self.held = 0  # bytes of request bodies held, by all connections
        self.waiting: deque[_Connection] = deque()  # connections with a head read, waiting to read its body
        self.idle_seconds = idle_seconds
        self.sweeper: asyncio.Task[None] | None = None
        self.max_body = max_body
        self.access_log = access_log
        self.max_connections = max_connections
        self.refused = refused
        self.connections: set[_Connection] = set()
        self.listeners: list[asyncio.Server] = []
        self.stopping = False
        self.warned = -WARN_EVERY

    def room(self) -> bool:
        """Whether a new connection may stay: below the limit, or once the one quiet longest is closed."""
        if len(self.connections) < self.max_connections:
            return True
        now = time.monotonic()
        quiet = [c for c in self.connections if c.sheddable(now)]
        if quiet:
            oldest = min(quiet, key=lambda c: c.quiet_since)
            oldest.shed()
            self.connections.discard(oldest)
            return True
        self.refused("connections")
        if now - self.warned >= WARN_EVERY:
            self.warned = now
            log.warning("%d connections, all busy: a new one was reset (--max-connections)", len(self.connections))
        return False

    def reserve(self, connection: _Connection, size: int) -> bool:
        """Whether a body of `size` bytes may be read now: within the budget, behind nobody waiting (or alone:
        one larger than the budget goes when nothing else is held). False: it waits its turn in `waiting`."""
        if not self.waiting and (self.held + size <= self.body_budget or self.held == 0):
            self.held += size
            return True
        self.waiting.append(connection)
        return False

    def release(self, size: int) -> None:
        """`size` bytes are no longer held: the connections waiting first read on, as far as the budget goes."""
        self.held -= size
        while self.waiting and (self.held + self.waiting[0].wants <= self.body_budget or self.held == 0):
            connection = self.waiting.popleft()
            self.held += connection.wants
            connection.unblock()

    def protocol(self) -> _Connection:
        if self.sweeper is None:
            self.sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return _Connection(self)

    async def _sweep(self) -> None:
        """Close keep-alive connections idle for idle_seconds (nothing read, nothing answered): a peer that
        never closes its own does not hold them for ever."""
        while not self.stopping:
            await asyncio.sleep(self.idle_seconds / 4)
            now = time.monotonic()
            for connection in list(self.connections):
                if connection.idle() and now - connection.quiet_since >= self.idle_seconds:
                    connection.close_if_idle()

    async def listen_tcp(self, host: str, port: int) -> int:
        """Listen at host:port (0: a free one); the port."""
        listener = await asyncio.get_running_loop().create_server(self.protocol, host, port)
        self.listeners.append(listener)
        return int(listener.sockets[0].getsockname()[1])

    async def listen_unix(self, path: str) -> None:
        self.listeners.append(await asyncio.get_running_loop().create_unix_server(self.protocol, path))

    async def stop(self, timeout: float) -> None:
        """Stop listening, close idle connections, give requests in flight `timeout` seconds, close the rest."""
        self.stopping = True
        if self.sweeper is not None:
            self.sweeper.cancel()
        for listener in self.listeners:
            listener.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for connection in list(self.connections):
                connection.close_if_idle()
            if not self.connections:
                break
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        for listener in self.listeners:
            await listener.wait_closed()
