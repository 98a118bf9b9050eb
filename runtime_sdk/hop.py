"""The runtime's HTTP/1.1 client for the one kind of peer it sends to: an Envoy listener on its own host.

A runtime sends every output, ensemble question and OIP request to its sidecar's egress listener or to the
host's shared one (runtime_sdk/egress.py), over a Unix socket or loopback TCP. aiohttp's client spends
~98 us of CPU per request on that; this one ~18 us (bench.hop_client; docs/benchmarks.md, "What was
tried for a cheaper hop"), because it does only what that peer needs: POST with a body, keep-alive, an
answer delimited by Content-Length, chunked encoding or the connection's end.

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

from multidict import CIMultiDict

MAX_CONNECTIONS = 100
MAX_HEAD = 64 * 1024
MAX_ANSWER = 64 * 1024 * 1024
JOINED = 64 * 1024  # a body up to this size goes in one write with its head; a larger one after it
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header name (RFC 9110)
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters (a tab is allowed): CR and LF end a header
_STATUS = re.compile(r"[1-5][0-9][0-9]( .*)?")  # the status line's code, then a space (or nothing)
_DIGITS = re.compile(r"[0-9]{1,18}")
_TCHAR = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# A chunk's size line: hex digits, then extensions `;name` or `;name=value` (a token or a quoted string), nothing
# else: a bare LF, spaces or text after the size would let two parsers read different bodies (smuggling).
_QUOTED = rb'"[^"\\\x00-\x1f\x7f]*"'
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})((?:;" + _TCHAR + rb"(?:=(?:" + _TCHAR + rb"|" + _QUOTED + rb"))?)*)")


class HopError(Exception):
    """No usable answer from the peer."""


class Unsent(HopError):
    """The request did not reach the peer: it may be sent elsewhere without being done twice."""


class TooLarge(ValueError):
    """A body over its limit."""


def take_chunks(buffer: bytearray, body: bytearray, limit: int) -> bool:
    """Move the whole chunks at the start of `buffer` into `body`; True once the last one and its trailers
    (ignored) are taken. ValueError for a malformed chunk, TooLarge past `limit` bytes of body.

    Both sides use it: the client for answers, wire.py for requests."""
    while True:
        line_end = buffer.find(b"\r\n")
        if line_end < 0:
            if len(buffer) > MAX_HEAD:
                raise ValueError("a chunk size line is too long")
            return False
        line = _CHUNK_LINE.fullmatch(bytes(buffer[:line_end]))  # a size, then only well-formed extensions
        if line is None:
            raise ValueError(f"bad chunk size line {bytes(buffer[:line_end])[:20]!r}")
        size = int(line[1], 16)
        if size == 0:  # the last chunk, then trailers up to an empty line
            trailers_end = buffer.find(b"\r\n\r\n", line_end)  # at line_end itself: no trailers
            if trailers_end < 0:
                if len(buffer) > MAX_HEAD:
                    raise ValueError(f"trailers over {MAX_HEAD} bytes")
                return False
            _check_trailers(bytes(buffer[line_end + 2 : trailers_end + 2]))
            del buffer[: trailers_end + 4]
            return True
        if len(body) + size > limit:
            raise TooLarge(f"over {limit} bytes")
        start = line_end + 2
        if len(buffer) < start + size + 2:
            return False
        if buffer[start + size : start + size + 2] != b"\r\n":
            raise ValueError("a chunk does not end where its size says")
        body += buffer[start : start + size]
        del buffer[: start + size + 2]


def _check_trailers(block: bytes) -> None:
    """Trailers (ignored) must still be header lines: `name: value`, nothing that could end a line early."""
    for line in block.decode("latin-1").split("\r\n")[:-1]:
        name, colon, value = line.partition(":")
        if not colon or not TOKEN.fullmatch(name) or not header_safe(value):
            raise ValueError(f"a trailer that is not `name: value`: {line[:40]!r}")


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

    status: int = 0
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    length: int | None = None  # None: chunked or until the end
    chunked: bool = False
    body: bytearray = field(default_factory=bytearray)  # chunked or until the end: what came so far
    pieces: Pieces | None = None  # by length
    keep_alive: bool = True

    def body_bytes(self) -> bytes:
        return bytes(self.body) if self.pieces is None else self.pieces.join()


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
        if reading is not None and reading.length is None and not reading.chunked and reading.status:
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
            self.answer.set_result(Answer(reading.status, reading.body_bytes(), reading.headers))
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
            self.reading = _head(bytes(self.buffer[:end]))
            del self.buffer[: end + 4]
        reading = self.reading
        if reading.length is not None and reading.length > self.max_answer:
            raise HopError(f"the answer is over {self.max_answer} bytes")
        if reading.chunked:
            try:
                return take_chunks(self.buffer, reading.body, self.max_answer)
            except TooLarge:
                raise HopError(f"the answer is over {self.max_answer} bytes") from None
            except ValueError as err:
                raise HopError(str(err)) from None
        if reading.pieces is None:  # until the connection ends (connection_lost finishes it)
            reading.body += self.buffer
            self.buffer.clear()
            if len(reading.body) > self.max_answer:
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


def _head(head: bytes) -> _Reading:
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if version not in ("HTTP/1.1", "HTTP/1.0") or not _STATUS.fullmatch(rest[:4]):  # "2000" is not 200
        raise HopError(f"not an HTTP/1.1 answer: {lines[0][:80]!r}")
    reading = _Reading(status=int(code), keep_alive=version == "HTTP/1.1")
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not TOKEN.fullmatch(name):
            raise HopError(f"bad header line in the answer: {line[:80]!r}")
        reading.headers.add(name, value.strip())
    connection = reading.headers.get("connection", "").lower()
    reading.keep_alive = (reading.keep_alive or "keep-alive" in connection) and "close" not in connection
    codings = [c.strip().lower() for c in ",".join(reading.headers.getall("transfer-encoding", [])).split(",")]
    if codings == ["chunked"]:
        reading.chunked = True
    elif codings != [""]:  # gzip, chunked: a body we would hand on still encoded
        raise HopError(f"an answer in a transfer coding other than chunked: {codings[:4]}")
    elif "content-length" in reading.headers:
        lengths = set(reading.headers.getall("content-length"))
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
