"""The runtime's HTTP/1.1 client for the one kind of peer it sends to: an Envoy listener on its own host.

A runtime sends every output, ensemble question and OIP request to its sidecar's egress listener or to the
host's shared one (runtime_sdk/egress.py), over a Unix socket or loopback TCP. aiohttp's client spends
~98 us of CPU per request on that; this one ~18 us (bench.hop_client; docs/benchmarks.md, "What was
tried for a cheaper hop"), because it does only what that peer needs: POST with a body, keep-alive, an
answer delimited by Content-Length, chunked encoding or the connection's end. Heads and chunks are read by
llhttp (httptools: `Message`, `read_head`, `take_chunked`, shared with the server in wire.py).

Bounds: MAX_CONNECTIONS open at once per peer (more requests wait for one), an answer's head MAX_HEAD bytes
and its body `max_answer` bytes (more is a HopError and the connection is dropped).
Failure: `Unsent` when the peer gave no byte of an answer (no connection; or one it closed first, which
Envoy does to idle connections when a listener drains; it is not sent again here, as aiohttp did not);
`HopError` for anything else that is not an answer.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import httptools
from multidict import CIMultiDict

MAX_CONNECTIONS = 100
MAX_HEAD = 64 * 1024
MAX_ANSWER = 64 * 1024 * 1024
JOINED = 64 * 1024  # a body up to this size goes in one write with its head; a larger one after it
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header name (RFC 9110)
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters (a tab is allowed): CR and LF end a header
_DIGITS = re.compile(r"[0-9]{1,18}")
# Header lines of a message (its head is bounded in bytes too: MAX_HEAD). Twice Envoy's default (100, which
# counts a caller's fields): what a gateway takes, it forwards with its own and the steering headers added, and a
# runtime must not refuse that (tests/test_payload_sizes.py).
MAX_FIELDS = 200
_END = b"\r\n\r\n"


class HopError(Exception):
    """No usable answer from the peer."""


class Unsent(HopError):
    """The request did not reach the peer: it may be sent elsewhere without being done twice."""


class TooLarge(ValueError):
    """A body over its limit."""


class TooManyFields(ValueError):
    """More than MAX_FIELDS header lines."""


class Message:
    """One HTTP/1.1 message as llhttp reads it (httptools calls these back): its target, its header fields and,
    when chunked, what its chunks held. Both sides use it: wire.py for requests, the client here for answers.
    A parser reads one message and is dropped: a head is fed up to its blank line and not a byte beyond
    (read_head), a body by length is taken without it (Pieces), a chunked one through it (take_chunked)."""

    __slots__ = ("body", "complete", "fields", "headers", "limit", "tail", "url", "wire")

    def __init__(self, limit: int = 0) -> None:
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []  # as they came (a chunked body's trailers too): MAX_FIELDS
        self.headers: CIMultiDict[str] = CIMultiDict()  # the head's fields, once read_head has read them
        self.body = bytearray()
        self.limit = limit  # bytes a chunked body may have
        self.wire = 0  # bytes of a chunked body fed, framing included: at most 4 x limit + MAX_HEAD
        self.complete = False
        self.tail = b""  # the last bytes fed, where the CRLF CRLF that ends a chunked message may begin

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.fields) >= MAX_FIELDS:
            raise TooManyFields(f"more than {MAX_FIELDS} header lines")
        self.fields.append((name, value))

    def on_body(self, data: bytes) -> None:
        if len(self.body) + len(data) > self.limit:
            raise TooLarge(f"over {self.limit} bytes")
        self.body += data

    def on_message_complete(self) -> None:
        self.complete = True


Parser = httptools.HttpRequestParser | httptools.HttpResponseParser


def feed(parser: Parser, data: bytes | memoryview) -> None:
    """Give `data` to the parser: ValueError with llhttp's reason for what is not HTTP/1.1, or what a callback
    raised (TooLarge, TooManyFields)."""
    try:
        parser.feed_data(data)
    except httptools.HttpParserCallbackError as err:
        cause = err.__context__
        raise cause if isinstance(cause, ValueError) else ValueError(str(err)) from None
    except httptools.HttpParserUpgrade:
        raise ValueError("a protocol upgrade (Connection: upgrade, or CONNECT), which is not served") from None
    except httptools.HttpParserError as err:
        raise ValueError(str(err) or type(err).__name__) from None


def read_head(parser: Parser, message: Message, head: bytes) -> None:
    """Feed a message's head (through its blank line) and take its header fields (names and values as latin-1
    text, values without the whitespace around them); ValueError etc. as `feed`."""
    feed(parser, head)
    headers = message.headers
    for name, value in message.fields:  # (one add at a time: 1.5x cheaper than building from a list)
        headers.add(name.decode("latin-1"), value.decode("latin-1").rstrip(" \t"))  # llhttp strips the left


def _end_of(tail: bytes, buffer: bytearray) -> int:
    """How much of `buffer` to feed next: up to the end of its first CRLF CRLF (one may begin in `tail`, the
    bytes fed before), or all of it."""
    for cut in range(min(3, len(tail)), 0, -1):
        if tail[-cut:] + bytes(buffer[: 4 - cut]) == _END:
            return 4 - cut
    found = buffer.find(_END)
    return len(buffer) if found < 0 else found + 4


def take_chunked(parser: Parser, message: Message, buffer: bytearray) -> bool:
    """Feed a chunked body from `buffer` to its message's parser, up to the message's end and not a byte beyond
    (what follows is the next message's); True once it has ended. Bounded: `message.limit` bytes of body, and
    4 x that + MAX_HEAD bytes on the wire (TooLarge). A chunked message ends right after a CRLF
    CRLF (its last chunk's line or last trailer, then the blank line), so the buffer goes in pieces that end at
    each CRLF CRLF and the message's completion is checked after each. ValueError etc. as `feed`."""
    while buffer and not message.complete:
        end = _end_of(message.tail, buffer)
        message.wire += end
        if message.wire > 4 * message.limit + MAX_HEAD:  # tiny chunks, long extensions or trailers
            raise TooLarge(f"chunked framing over {4 * message.limit + MAX_HEAD} bytes for a body of {message.limit}")
        with memoryview(buffer) as view, view[:end] as piece:
            feed(parser, piece)
        message.tail = (message.tail + bytes(buffer[max(0, end - 3) : end]))[-3:]
        del buffer[:end]
    return message.complete


@dataclass
class Pieces:
    """A body of known length kept as the pieces it arrives in and joined once, not copied into a buffer and
    out again at every read (an 8 MB body comes in ~100 reads). Both sides use it: wire.py for requests, the
    client here for answers."""

    length: int
    parts: list[bytes] = field(default_factory=list)
    received: int = 0

    @property
    def missing(self) -> int:
        return self.length - self.received

    @property
    def complete(self) -> bool:
        return self.received == self.length

    def take(self, data: bytes) -> bytes:
        """Keep what of `data` is this body's; the rest (what follows it)."""
        piece = data if len(data) <= self.missing else data[: self.missing]
        if piece:
            self.parts.append(piece)
            self.received += len(piece)
        return data[len(piece) :]

    def join(self) -> bytes:
        return b"".join(self.parts)


class Answer(NamedTuple):
    status: int
    body: bytes
    headers: CIMultiDict[str]


def header_safe(value: str) -> bool:
    """Whether `value` can be sent as a header value as it is (no line break or NUL to end the header early)."""
    return _UNSAFE.search(value) is None


def request_head(host: str, path: str, length: int, headers: Mapping[str, str]) -> bytes:
    """The request line and headers of a POST; a ValueError for a name or value that would forge others."""
    if not path.startswith("/") or _UNSAFE.search(path) or " " in path:
        raise ValueError(f"not a request path: {path!r}")
    lines = [f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {length}\r\n"]
    for name, value in headers.items():
        if not TOKEN.fullmatch(name) or not header_safe(value):
            raise ValueError(f"header {name!r} cannot be sent: {value[:80]!r}")
        if name.lower() not in ("host", "content-length", "transfer-encoding", "connection"):
            lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


@dataclass
class _Reading:
    """One answer being read: its head, then its body (by length, chunks, or until the connection ends)."""

    status: int
    message: Message  # its headers; chunked or until the end, what came of the body so far
    length: int | None = None  # None: chunked or until the end
    parser: Parser | None = None  # chunked: the parser its chunks go through
    pieces: Pieces | None = None  # by length
    keep_alive: bool = True

    def body_bytes(self) -> bytes:
        return bytes(self.message.body) if self.pieces is None else self.pieces.join()


class _Connection(asyncio.Protocol):
    def __init__(self, max_answer: int) -> None:
        self.max_answer = max_answer
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.answer: asyncio.Future[Answer] | None = None
        self.reading: _Reading | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, head: bytes, body: bytes) -> asyncio.Future[Answer]:
        assert self.transport is not None
        self.answer = asyncio.get_running_loop().create_future()
        self.reading, self.buffer = None, bytearray()
        if len(body) <= JOINED:
            self.transport.write(head + body)
        else:  # a large body is not copied once more to follow its head in one buffer
            self.transport.write(head)
            self.transport.write(body)
        return self.answer

    def data_received(self, data: bytes) -> None:
        if self.answer is None or self.answer.done():
            self.close()  # bytes nobody asked for: the connection cannot be trusted any more
            return
        reading = self.reading
        if reading is not None and reading.status >= 200 and reading.pieces is not None and not self.buffer:
            data = reading.pieces.take(data)  # a body by length arriving, nothing before it unread
            if not reading.pieces.complete:
                return
        self.buffer += data
        try:
            done = self._parse()
        except HopError as err:
            self._fail(err)
            return
        if done:
            self._finish()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reading = self.reading
        if reading is not None and reading.length is None and reading.parser is None and reading.status:
            self._finish()  # an answer delimited by the connection's end
        elif reading is None and not self.buffer:
            self._fail(Unsent(f"the peer closed the connection before answering: {exc or 'closed'}"))
        else:
            self._fail(HopError(f"the peer closed the connection in the middle of its answer: {exc or 'closed'}"))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, err: HopError) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(err)
        self.close()

    def _finish(self) -> None:
        reading = self.reading
        assert reading is not None and self.answer is not None
        if not self.answer.done():
            self.answer.set_result(Answer(reading.status, reading.body_bytes(), reading.message.headers))
        self.reading = None
        if self.buffer or not reading.keep_alive:
            self.close()

    def _parse(self) -> bool:
        """Consume what has arrived; True once the whole answer is in."""
        while self.reading is None or self.reading.status < 200:
            end = self.buffer.find(b"\r\n\r\n")
            if end > MAX_HEAD or (end < 0 and len(self.buffer) > MAX_HEAD):
                raise HopError(f"the answer's head is over {MAX_HEAD} bytes")
            if end < 0:
                return False
            self.reading = _head(bytes(self.buffer[: end + 4]), self.max_answer)
            del self.buffer[: end + 4]
        reading = self.reading
        if reading.length is not None and reading.length > self.max_answer:
            raise HopError(f"the answer is over {self.max_answer} bytes")
        if reading.parser is not None:  # chunked
            try:
                return take_chunked(reading.parser, reading.message, self.buffer)
            except TooLarge:
                raise HopError(f"the answer is over {self.max_answer} bytes") from None
            except ValueError as err:
                raise HopError(f"a malformed chunked answer: {err}") from None
        if reading.pieces is None:  # until the connection ends (connection_lost finishes it)
            reading.message.body += self.buffer
            self.buffer.clear()
            if len(reading.message.body) > self.max_answer:
                raise HopError(f"the answer is over {self.max_answer} bytes")
            return False
        return take_buffered(self.buffer, reading.pieces)


def take_buffered(buffer: bytearray, pieces: Pieces) -> bool:
    """Move what `buffer` holds of a body by length into its pieces; True once it is all in."""
    take = min(len(buffer), pieces.missing)
    if take:
        pieces.take(bytes(buffer[:take]))
        del buffer[:take]
    return pieces.complete


def _head(head: bytes, max_answer: int) -> _Reading:
    """An answer's head, through its blank line, read by llhttp; HopError if it is not HTTP/1.1."""
    message = Message(max_answer)
    parser = httptools.HttpResponseParser(message)
    try:
        read_head(parser, message, head)
    except ValueError as err:
        raise HopError(f"not an HTTP/1.1 answer ({err}): {head[:80]!r}") from None
    version = parser.get_http_version()
    if version not in ("1.1", "1.0") or not 100 <= parser.get_status_code() <= 599:
        raise HopError(f"not an HTTP/1.1 answer: {head[:80]!r}")
    reading = _Reading(status=parser.get_status_code(), message=message, keep_alive=version == "1.1")
    headers = message.headers
    connection = headers.get("connection", "").lower()
    reading.keep_alive = (reading.keep_alive or "keep-alive" in connection) and "close" not in connection
    codings = [c.strip().lower() for c in ",".join(headers.getall("transfer-encoding", [])).split(",")]
    if codings == ["chunked"]:
        reading.parser = parser  # its chunks go through the parser that read the head
    elif codings != [""]:  # gzip, chunked: a body we would hand on still encoded
        raise HopError(f"an answer in a transfer coding other than chunked: {codings[:4]}")
    elif "content-length" in headers:
        lengths = set(headers.getall("content-length"))
        text = lengths.pop()
        if lengths or not _DIGITS.fullmatch(text):
            raise HopError(f"bad content-length in the answer: {text[:20]!r}")
        reading.length = int(text)
    elif reading.status in (204, 304) or reading.status < 200:
        reading.length = 0
    else:
        reading.keep_alive = False  # the body runs to the connection's end
    reading.pieces = None if reading.length is None else Pieces(reading.length)
    return reading


class HopClient:
    """Keep-alive connections to one peer, a Unix socket `path` or 127.0.0.1:`port`; `post` is all it does."""

    def __init__(
        self, path: str | None = None, port: int | None = None, host: str = "sidecar", max_answer: int = MAX_ANSWER
    ) -> None:
        self.path, self.port, self.max_answer = path, port, max_answer
        self.host = f"127.0.0.1:{port}" if port else host  # the Host header: Envoy's routes match any
        self.idle: list[_Connection] = []
        self.slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def post(self, path: str, body: bytes | str, headers: Mapping[str, str]) -> Answer:
        data = body.encode() if isinstance(body, str) else body
        head = request_head(self.host, path, len(data), headers)
        async with self.slots:
            return await self._exchange(self._idle() or await self._connect(), head, data)

    async def _exchange(self, connection: _Connection, head: bytes, body: bytes) -> Answer:
        try:
            answer = await connection.send(head, body)
        except BaseException:
            connection.close()  # failed or cancelled mid-answer: what is left of it must not reach the next caller
            raise
        if not connection.closed:
            self.idle.append(connection)
        return answer

    def _idle(self) -> _Connection | None:
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed and connection.transport and not connection.transport.is_closing():
                return connection
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            if self.path:
                _, connection = await loop.create_unix_connection(lambda: _Connection(self.max_answer), self.path)
            else:
                _, connection = await loop.create_connection(
                    lambda: _Connection(self.max_answer), "127.0.0.1", self.port or 0
                )
        except OSError as err:
            raise Unsent(f"cannot connect to {self.path or self.host}: {err}") from err
        return connection

    async def close(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()
