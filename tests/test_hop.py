"""The runtime's HTTP/1.1 client (runtime_sdk/hop.py) against a peer that answers exactly the bytes a test
writes: every way an answer can be framed, broken, too large or cut off, forged headers on the way out, a
caller that gives up mid-answer, and more callers than connections. Real Envoy answers it in every
end-to-end test (each runtime's output goes through it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from runtime_sdk.ensemble import hop_headers
from runtime_sdk.hop import MAX_CONNECTIONS, MAX_HEAD, HopClient, HopError, Unsent
from tests.helpers.envoy import wait_for
from tests.helpers.paths import short_dir

Reply = Callable[[bytes, asyncio.StreamWriter], "asyncio.Future[None] | None"]
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class Peer:
    """A Unix-socket server: reads each request (head + content-length body), answers with `reply`."""

    def __init__(self, reply: Callable[[bytes], bytes | None], hang_up: bool = False) -> None:
        self.reply, self.hang_up = reply, hang_up  # hang_up: close each connection after one answer
        self.requests: list[bytes] = []
        self.connections = 0
        self.open = 0
        self.most_open = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.startswith(b"content-length"))
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                answer = self.reply(request)
                if answer is None:  # hang up without a word
                    break
                writer.write(answer)
                await writer.drain()
                head = answer.split(b"\r\n\r\n")[0].lower()
                framed = b"content-length" in head or b"chunked" in head or b" 204 " in head
                if self.hang_up or b"connection: close" in head or not framed:
                    break  # as HTTP says: the end of the connection ends the answer
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            writer.close()


@asynccontextmanager
async def peer(reply: Callable[[bytes], bytes | None], hang_up: bool = False) -> AsyncIterator[tuple[Peer, HopClient]]:
    path = short_dir() / "peer.sock"
    server = Peer(reply, hang_up)
    listening = await asyncio.start_unix_server(server.serve, str(path))
    client = HopClient(path=str(path), max_answer=1000)
    try:
        yield server, client
    finally:
        await client.close()
        listening.close()


async def test_answers_by_length_by_chunks_and_to_the_end_and_keep_alive_reuses_one_connection() -> None:
    replies = iter(
        [
            OK,
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nX-Mll-Served: a=m:v1\r\n\r\n"
            b'3;ext=1\r\n{"a\r\n5\r\n": 1}\r\n0\r\nx-trailer: t\r\n\r\n',
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n[]",
            b"HTTP/1.1 200 OK\r\n\r\nto the end",  # no length: the body runs until the connection ends
        ]
    )
    async with peer(lambda _: next(replies)) as (server, client):
        first = await client.post("/pipelines/p/v1/b", "{}", {"content-type": "application/json"})
        assert (first.status, first.body, first.headers["Content-Type"]) == (200, b"{}", "application/json")
        chunked = await client.post("/x", b"{}", {})
        assert (chunked.status, chunked.body, chunked.headers["x-mll-served"]) == (201, b'{"a": 1}', "a=m:v1")
        assert (await client.post("/x", "{}", {})).body == b""
        assert server.connections == 1  # kept alive: one connection for three answers
        assert (await client.post("/x", "{}", {})).body == b"[]"
        assert (await client.post("/x", "{}", {})).body == b"to the end"
        assert server.connections == 2  # `connection: close` was honoured
    sent = server.requests[0]
    assert sent.startswith(b"POST /pipelines/p/v1/b HTTP/1.1\r\n") and b"\r\ncontent-length: 2\r\n" in sent


async def test_an_answer_by_length_in_pieces_is_read_whole_and_bytes_after_it_end_the_connection() -> None:
    """hop.py keeps a body by length as its pieces arrive: cut anywhere, it is read whole; bytes after the
    answer that nobody asked for (a peer out of step) close the connection rather than start the next answer."""
    body = bytes(range(256)) * 400  # 100 KB: more than one read
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    cuts = [20, len(answer) - len(body) + 1, 50_000, len(answer) - 1]  # in the head, 1 byte of body, mid, last

    connections = []

    async def pieces(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while True:
            try:
                await reader.readuntil(b"{}")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            for start, end in zip([0, *cuts], [*cuts, len(answer)], strict=True):
                writer.write(answer[start:end])
                await writer.drain()
                await asyncio.sleep(0.01)  # pacing: each piece its own read
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]")  # nobody asked for this

    path = short_dir() / "pieces.sock"
    listening = await asyncio.start_unix_server(pieces, str(path))
    client = HopClient(path=str(path))
    try:
        for _ in range(2):
            assert (await client.post("/x", "{}", {})).body == body
            await wait_for(lambda: all(c.closed for c in client.idle), 5)  # the stray answer closes it
        assert len(connections) == 2
    finally:
        await client.close()
        listening.close()


async def test_an_answer_in_single_bytes_is_read_whole() -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"{}")
        for byte in b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n":
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0)
        await reader.read()

    path = short_dir() / "trickle.sock"
    listening = await asyncio.start_unix_server(trickle, str(path))
    client = HopClient(path=str(path))
    try:
        assert (await client.post("/x", "{}", {})).body == b"hello"
    finally:
        await client.close()
        listening.close()


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (b"SMTP 220 hello\r\n\r\n", "not an HTTP/1.1 answer"),
        (b"HTTP/1.1 2x0 OK\r\n\r\n", "not an HTTP/1.1 answer"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "Invalid header token"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", "Invalid character in Content-Length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}", "Duplicate Content-Length"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", "Invalid character in chunk size"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabc\r\n", "Expected LF after chunk data"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 1001\r\n\r\n" + b"x" * 1001, "over 1000 bytes"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3e9\r\n" + b"x" * 1001 + b"\r\n", "over 1000 bytes"),
        (b"HTTP/1.1 200 OK\r\nx: " + b"y" * MAX_HEAD + b"\r\n\r\n", f"over {MAX_HEAD} bytes"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}", "in the middle of its answer"),
        # From the review (issue 41): a four-digit status, a coding that is not only chunked, a length in
        # digits int() reads but HTTP does not, a chunk line with a bare LF after its size.
        (b"HTTP/1.1 2000 OK\r\ncontent-length: 2\r\n\r\n{}", "not an HTTP/1.1 answer"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "other than chunked"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: \xb2\r\n\r\n", "Invalid character in Content-Length"),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2;\n{}\r\n0\r\n\r\n",
            "Missing expected CR after chunk extension",
        ),
    ],
)
async def test_what_is_not_an_answer_is_an_error_and_the_connection_is_not_used_again(answer: bytes, says: str) -> None:
    replies = iter([answer, OK])

    async with peer(lambda _: next(replies), hang_up=True) as (server, client):
        with pytest.raises(HopError, match=says) as raised:
            await client.post("/x", "{}", {})
        assert not isinstance(raised.value, Unsent)  # bytes came back: it may have been done
        assert (await client.post("/x", "{}", {})).body == b"{}"  # on a new connection
        assert server.connections == 2


async def test_no_answer_at_all_is_unsent() -> None:
    async with peer(lambda _: None) as (_, client):
        with pytest.raises(Unsent, match="closed the connection before answering"):
            await client.post("/x", "{}", {})
    with pytest.raises(Unsent, match="cannot connect"):
        await HopClient(path=str(short_dir() / "nobody.sock")).post("/x", "{}", {})


async def test_a_header_or_path_that_would_forge_another_is_refused_before_anything_is_sent() -> None:
    async with peer(lambda _: OK) as (server, client):
        for headers, path in [
            ({"x-mll-branch": "en\r\nx-mll-stage: admin"}, "/x"),
            ({"x-mll-branch": "en\nx"}, "/x"),
            ({"bad name": "v"}, "/x"),
            ({}, "/x HTTP/1.1\r\nhost: y"),
            ({}, "x"),
        ]:
            with pytest.raises(ValueError, match=r"cannot be sent|not a request path"):
                await client.post(path, "{}", headers)
        assert server.requests == []
    # A model's branch key with a line break names no branch: it goes without one (the stage's 422).
    assert "x-mll-branch" not in hop_headers({}, {"lang": "en\r\nx: 1"}, "lang")
    assert hop_headers({}, {"lang": "en"}, "lang")["x-mll-branch"] == "en"


async def test_a_caller_that_gives_up_mid_answer_leaves_nothing_for_the_next() -> None:
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            await reader.readexactly(2)
            if b"/slow" in head:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nst")
                await release.wait()
                writer.write(b"ale")  # the rest of the abandoned answer
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfresh")
            await writer.drain()

    path = short_dir() / "slow.sock"
    listening = await asyncio.start_unix_server(slow, str(path))
    client = HopClient(path=str(path))
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await client.post("/slow", "{}", {})
        release.set()
        assert (await client.post("/fast", "{}", {})).body == b"fresh"
    finally:
        await client.close()
        listening.close()


async def test_more_callers_than_connections_wait_for_one() -> None:
    async with peer(lambda _: OK) as (server, client):
        answers = await asyncio.gather(*(client.post("/x", "{}", {}) for _ in range(MAX_CONNECTIONS + 50)))
        assert [a.status for a in answers] == [200] * (MAX_CONNECTIONS + 50)
        assert server.most_open <= MAX_CONNECTIONS and len(client.idle) <= MAX_CONNECTIONS
