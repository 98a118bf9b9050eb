"""The runtime's HTTP server (runtime_sdk/wire.py) against a client that writes exact bytes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
from collections.abc import AsyncIterator

import h11
import pytest

from runtime_sdk import wire
from runtime_sdk.hop import MAX_FIELDS
from runtime_sdk.http1 import BadRequest, HttpError, Request, Response, json_response
from runtime_sdk.wire import MAX_HEAD, MAX_QUEUED, Server
from tests.helpers.envoy import wait_for

MAX_BODY = 1000


async def echo(request: Request) -> Response:
    """Echoes what it was given; a few paths misbehave on purpose."""
    if request.path == "/raise":
        raise RuntimeError("a bug")
    if request.path == "/refuse":
        raise HttpError(422, "no thanks", field="x")
    if request.path == "/forge":
        return Response(200, b"{}", {"x-a": "1\r\nset-cookie: forged"})
    if request.path == "/slow":
        await asyncio.sleep(0.3)  # simulated work
    seen = {"method": request.method, "path": request.path, "query": request.query, "body": request.body.decode()}
    return json_response({**seen, "x-test": request.headers.getall("x-test", [])})


@pytest.fixture
async def port() -> AsyncIterator[int]:
    server = Server(echo, MAX_BODY)
    found = await server.listen_tcp("127.0.0.1", 0)
    yield found
    await server.stop(1.0)


Answers = list[tuple[int, dict[str, str], bytes]]


async def exchange(port: int, raw: bytes, answers: int = 1) -> Answers:
    """Send `raw`, read `answers` answers (fewer if the server closes): (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    found = []
    try:
        for _ in range(answers):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
            body = await reader.readexactly(int(headers["content-length"]))
            found.append((int(lines[0].split(" ")[1]), headers, body))
    except (asyncio.IncompleteReadError, ConnectionError):  # closed, or reset
        pass
    finally:
        writer.close()
    return found


CHUNKED = b"POST /p HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode() + body


async def test_keep_alive_pipelined_requests_are_answered_in_order(port: int) -> None:
    raw = post("/slow", b"1") + post("/a?q=1", b"2", "x-test: a\r\nX-Test: b\r\n") + post("/c", b"")
    answers = await exchange(port, raw, 3)
    assert [a[0] for a in answers] == [200, 200, 200]
    bodies = [json.loads(a[2]) for a in answers]
    assert [b["path"] for b in bodies] == ["/slow", "/a", "/c"]
    assert bodies[1] == {"method": "POST", "path": "/a", "query": "q=1", "body": "2", "x-test": ["a", "b"]}
    assert "connection" not in answers[0][1] and "date" in answers[0][1]


async def test_a_chunked_body_arriving_a_byte_at_a_time(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = CHUNKED + b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nx-t: 1\r\n\r\n"
    for byte in raw:
        writer.write(bytes([byte]))
        await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(next(x for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")).split(b":")[1])
    assert json.loads(await reader.readexactly(length))["body"] == "abcde"
    writer.close()


async def test_bodies_in_pieces_cut_anywhere_are_read_whole_and_in_order() -> None:
    """Bodies by length are kept as they arrive (wire.py's fast path), so the cuts that matter are a body's
    first byte in the same read as its head, a read that ends a body and starts the next request, and bodies
    larger than one read; answers larger than JOINED go as a separate write. Eight seeds of random cuts."""
    server = Server(echo, 1 << 20)
    port = await server.listen_tcp("127.0.0.1", 0)
    try:
        for seed in range(8):
            rng = random.Random(seed)
            bodies = [
                rng.randbytes(rng.choice([0, 1, 700, 70_000, 300_000])).hex()[: rng.randrange(1, 400_000)]
                for _ in range(4)
            ]
            raw = b"".join(post(f"/{i}", b.encode()) for i, b in enumerate(bodies))
            raw += CHUNKED + b"3\r\nabc\r\n0\r\n\r\n" + post("/last", b"z")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            cuts = sorted(rng.sample(range(1, len(raw)), 12))
            for start, end in zip([0, *cuts], [*cuts, len(raw)], strict=True):
                writer.write(raw[start:end])
                await writer.drain()
                await asyncio.sleep(0)  # each piece its own read, mostly
            for i, want in enumerate([*bodies, "abc", "z"]):
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = int(next(x for x in head.split(b"\r\n") if x.startswith(b"content-length")).split(b":")[1])
                answer = json.loads(await reader.readexactly(length))
                assert (head[:12], answer["body"]) == (b"HTTP/1.1 200", want), (seed, i)
            writer.close()
    finally:
        await server.stop(1.0)


async def held_and_waiting(server: Server, port: int) -> tuple[asyncio.Task[Answers], asyncio.Task[Answers]]:
    """A 1,000-byte budget's server: a request of 700 bytes held at /hold, then one of 400 waiting unread."""
    holder = asyncio.create_task(exchange(port, post("/hold", b"h" * 700)))
    await wait_for(lambda: server.held == 700)
    waiter = asyncio.create_task(exchange(port, post("/w", b"w" * 400)))
    await wait_for(lambda: len(server.waiting) == 1)
    return holder, waiter


async def test_bodies_beyond_the_budget_wait_unread_and_are_answered_in_turn() -> None:
    """The server's body budget (memory under bursts of large requests): a request whose body would take the
    held bytes past it waits with its body unread, in order of arrival; one larger than the budget goes alone;
    a request without a body never waits; a caller that hangs up while waiting is let go at its turn."""
    inside, most = [0], [0]
    release = asyncio.Event()

    async def hold(request: Request) -> Response:
        inside[0] += len(request.body)
        most[0] = max(most[0], inside[0])
        try:
            if request.path == "/hold":
                await release.wait()
            await asyncio.sleep(0.05)  # simulated work: requests overlap if the budget lets them
        finally:  # (a caller that hung up cancels it)
            inside[0] -= len(request.body)
        return json_response({"n": len(request.body)})

    server = Server(hold, 1000, body_budget=1000)
    port = await server.listen_tcp("127.0.0.1", 0)
    try:
        holder, waiter = await held_and_waiting(server, port)
        # Held: 700 of 1000, a 400-byte body waits unread; a request without one is answered meanwhile.
        assert [a[0] for a in await exchange(port, b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")] == [200]
        # One that waits and hangs up (its connection is not read while it waits) is let go at its turn.
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/gone", b"g" * 400))
        await wait_for(lambda: len(server.waiting) == 2)
        writer.close()
        release.set()
        assert [a[0] for a in await holder] == [200] and [a[0] for a in await waiter] == [200]
        await wait_for(lambda: (server.held, len(server.waiting)) == (0, 0), 5)
        # A burst: eight 600-byte bodies and one of 1,000 (as large as the budget: it goes alone).
        sizes = [600] * 4 + [1000] + [600] * 4
        answers = await asyncio.gather(*(exchange(port, post("/b", b"x" * n)) for n in sizes))
        assert [json.loads(a[0][2])["n"] for a in answers] == sizes
        assert most[0] <= 1000 and (server.held, len(server.waiting)) == (0, 0), (most, server.held)
    finally:
        await server.stop(1.0)


async def test_a_request_waiting_for_the_body_budget_is_never_shed_as_stalled(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every connection in use, a quiet one may be closed for a new one with a 408 ("stopped arriving"): not one
    whose body the server itself is not reading while it waits for the budget. The newcomer is reset instead."""
    monkeypatch.setattr(wire, "STALLED", 0.0)  # every begun request counts as stalled at once
    release = asyncio.Event()

    async def hold(request: Request) -> Response:
        if request.path == "/hold":
            await release.wait()
        return json_response({"n": len(request.body)})

    server = Server(hold, 1000, max_connections=2, body_budget=1000)
    port = await server.listen_tcp("127.0.0.1", 0)
    try:
        holder, waiter = await held_and_waiting(server, port)
        assert await exchange(port, post("/new", b"n")) == []  # reset: no room, nobody to shed
        release.set()
        assert [a[0] for a in await holder] == [200] and [a[0] for a in await waiter] == [200]
    finally:
        await server.stop(1.0)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"POST /a HTTP/1.1 extra\r\n\r\n", 400),
        (b"POST a HTTP/1.1\r\n\r\n", 400),  # not a path
        (b"POST /a\x01b HTTP/1.1\r\n\r\n", 400),
        (b"POST /a HTTP/2.0\r\n\r\n", 505),
        (b"POST /a HTTP/1.1\r\nno colon\r\n\r\n", 400),
        (b"POST /a HTTP/1.1\r\nbad name: 1\r\n\r\n", 400),
        (b"POST /a HTTP/1.1\r\n folded: 1\r\n\r\n", 400),
        (b"POST /a HTTP/1.1\r\nx: a\x00b\r\n\r\n", 400),
        (b"POST /a HTTP/1.1\r\nx: a\nset-cookie: b\r\n\r\n", 400),  # a bare LF: a header smuggled in
        (b"POST /a HTTP/1.1\r\ncontent-length: -1\r\n\r\n", 400),
        (b"POST /a HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab", 400),
        (b"POST /a HTTP/1.1\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n", 400),  # smuggling
        (b"POST /a HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n", 501),
        (b"POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabc\r\n", 400),  # longer than its size
        (b"POST /a HTTP/1.1\r\ncontent-length: 1001\r\n\r\n", 413),
        (CHUNKED + b"3e9\r\n" + b"a" * 1001 + b"\r\n0\r\n\r\n", 413),
        (b"POST /a HTTP/1.1\r\nx: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431),
        # Smuggling patterns from the review (issue 41): a bare LF in a chunk's size line would make the next
        # line the data; spaces, a bare `;`, a trailer that is not a header; chunks in an HTTP/1.0 request.
        (b"POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5;\nabcde\r\n12345\r\n0\r\n\r\n", 400),
        (b"POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5 \r\nabcde\r\n0\r\n\r\n", 400),
        (b"POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n 5\r\nabcde\r\n0\r\n\r\n", 400),
        (b"POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5;\r\nabcde\r\n0\r\n\r\n", 400),
        (b"POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\nno colon\r\n\r\n", 400),
        (b"POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\nx: a\x00\r\n\r\n", 400),
        (b"POST /a HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n", 400),
        (b"POST /a HTTP/1.1\r\n" + b"x: 1\r\n" * (MAX_FIELDS + 1) + b"\r\n", 431),  # more header lines than allowed
        (CHUNKED + b"0\r\n" + b"x: 1\r\n" * (MAX_FIELDS - 1) + b"\r\n", 431),  # trailers count with the head's 2
        (CHUNKED + b"1;" + b"e" * 70_000 + b"\r\nx\r\n0\r\n\r\n", 413),  # framing over 4 x 1000 + 64 KiB
        (b"POST /a HTTP/1.1\r\ncontent-length: 0\r\n\r\n", 400),  # HTTP/1.1 without a Host (RFC 9112, 3.2)
        (b"POST /a HTTP/1.1\r\nhost: a\r\nhost: b\r\ncontent-length: 0\r\n\r\n", 400),  # or with two
        (b"POST /a HTTP/1.1\r\nhost: x\r\nx: a\x1bb\r\n\r\n", 400),  # a control character in a value
    ],
)
async def test_a_request_that_is_not_http_gets_its_4xx_and_the_connection_closes(
    port: int, raw: bytes, status: int
) -> None:
    answers = await exchange(port, raw + post("/after", b""), 2)  # what follows a framing error is not read
    assert [a[0] for a in answers] == [status], answers
    assert answers[0][1]["connection"] == "close" and "error" in json.loads(answers[0][2])


async def test_well_formed_chunk_extensions_and_trailers_are_read_and_a_head_answer_has_no_body(port: int) -> None:
    raw = CHUNKED + b'3;a;b=c;d="x y"\r\nabc\r\n0\r\nx-t: 1\r\n\r\n'
    (answer,) = await exchange(port, raw)
    assert answer[0] == 200 and json.loads(answer[2])["body"] == "abc"
    # HEAD: the answer's head (its length as it would be), no body, and the connection goes on in step.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"HEAD /p HTTP/1.1\r\nhost: x\r\n\r\n" + post("/after", b"z"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: " in head
    after = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert after.startswith(b"HTTP/1.1 200 "), after  # not the HEAD answer's body read as the next answer
    writer.close()


async def test_a_chunked_body_ends_where_llhttp_says_however_the_bytes_are_cut(port: int) -> None:
    """A chunked body goes through llhttp in pieces that end at each CRLF CRLF (where such a message can end), so
    nothing of the request after it is fed to its parser. Its data holds CRLF CRLF and a last chunk's bytes, it
    has trailers, and a request follows on the same connection; every cut point of the bytes, each its own read."""
    first = CHUNKED + b"a\r\na\r\n\r\n0\r\n\r\n\r\n2;x=1\r\nzz\r\n0\r\nx-t: 1\r\nx-u: 2\r\n\r\n"
    raw = first + CHUNKED + b"1\r\n!\r\n0\r\n\r\n" + post("/after", b"ok")
    for cut in range(1, len(raw)):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw[:cut])
        await writer.drain()
        await asyncio.sleep(0.002)  # simulated network: the two pieces arrive as two reads, mostly
        writer.write(raw[cut:])
        bodies = []
        for _ in range(3):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(next(x for x in head.split(b"\r\n") if x.startswith(b"content-length")).split(b":")[1])
            bodies.append(json.loads(await reader.readexactly(length))["body"])
        assert bodies == ["a\r\n\r\n0\r\n\r\nzz", "!", "ok"], cut
        writer.close()


async def test_a_head_without_end_over_the_limit_is_refused_before_it_ends(port: int) -> None:
    answers = await exchange(port, b"POST /a HTTP/1.1\r\nx: " + b"a" * (MAX_HEAD + 10), 1)
    assert [a[0] for a in answers] == [431]


async def test_handler_failures_become_answers_and_the_connection_goes_on(port: int) -> None:
    answers = await exchange(
        port, post("/raise", b"") + post("/refuse", b"") + post("/forge", b"") + post("/ok", b""), 4
    )
    assert [a[0] for a in answers] == [500, 422, 500, 200]
    assert json.loads(answers[1][2]) == {"error": "no thanks", "field": "x"}
    assert "set-cookie" not in answers[2][1]  # a header value with a line break is never sent as it is
    assert "a bug" not in answers[0][2].decode()  # the detail stays in the log


async def test_connection_close_and_http_1_0_end_the_connection(port: int) -> None:
    answers = await exchange(port, post("/a", b"", "connection: close\r\n") + post("/b", b""), 2)
    assert [(a[0], a[1]["connection"]) for a in answers] == [(200, "close")]
    answers = await exchange(port, b"POST /a HTTP/1.0\r\ncontent-length: 0\r\n\r\n" + post("/b", b""), 2)
    assert [(a[0], a[1]["connection"]) for a in answers] == [(200, "close")]


async def test_a_connection_that_sends_ahead_is_read_no_further_than_the_queue_allows() -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    seen: list[str] = []

    async def gated(request: Request) -> Response:
        seen.append(request.path)
        started.set()
        await release.wait()
        return json_response({})

    server = Server(gated, MAX_BODY)
    port = await server.listen_tcp("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"".join(post(f"/{n}", b"x" * 100) for n in range(MAX_QUEUED * 20)))
    await started.wait()
    await wait_for(lambda: any(c.paused for c in server.connections), 5)  # it stopped reading
    connection = next(iter(server.connections))
    assert connection.paused and len(connection.queue) <= MAX_QUEUED + 1
    release.set()
    for _ in range(MAX_QUEUED * 20):
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n{}"), 5)
    assert seen == [f"/{n}" for n in range(MAX_QUEUED * 20)]  # every one, in order
    writer.close()
    await server.stop(1.0)


async def test_stop_lets_a_request_in_flight_finish_and_closes_idle_connections() -> None:
    server = Server(echo, MAX_BODY)
    port = await server.listen_tcp("127.0.0.1", 0)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    in_flight = asyncio.create_task(exchange(port, post("/slow", b"1"), 1))
    await wait_for(lambda: any(c.task for c in server.connections), 5)  # the handler runs
    await server.stop(5.0)
    answers = await in_flight
    assert [(a[0], a[1].get("connection")) for a in answers] == [(200, "close")]
    assert await asyncio.wait_for(idle_reader.read(), 2) == b""  # closed by the server
    idle_writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_a_client_that_expects_100_continue_is_told_to_go_on(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /e HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"ok")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 ")
    writer.close()


async def test_connections_beyond_the_limit_close_the_idlest_or_are_reset_when_all_are_busy() -> None:
    refused: list[str] = []
    release = asyncio.Event()

    async def handler(request: Request) -> Response:
        if request.path == "/wait":
            await release.wait()
        return json_response({"path": request.path})

    async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> int:
        writer.write(post(path, b""))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(next(x for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")).split(b":")[1])
        await reader.readexactly(length)
        return int(head.split(b" ")[1])

    server = Server(handler, MAX_BODY, max_connections=3, refused=refused.append)
    port = await server.listen_tcp("127.0.0.1", 0)
    # Three kept-alive connections, the first idle longest; a fourth closes that one, not the others.
    opened = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    for reader, writer in opened:
        assert await ask(reader, writer, "/a") == 200
        await asyncio.sleep(0.01)  # time passing: each connection's last answer at its own time
    fourth = await asyncio.open_connection("127.0.0.1", port)
    assert await ask(*fourth, "/b") == 200
    assert await asyncio.wait_for(opened[0][0].read(), 2) == b""  # the idlest, closed by the server
    assert [await ask(*c, "/c") for c in (opened[1], opened[2], fourth)] == [200, 200, 200]
    assert len(server.connections) == 3 and refused == []
    # All three busy: one more is reset without an answer, counted, and nothing in flight is lost.
    busy = [asyncio.create_task(ask(*c, "/wait")) for c in (opened[1], opened[2], fourth)]
    await wait_for(lambda: sum(c.task is not None for c in server.connections) == 3, 5)  # all three in a handler
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post("/d", b""))
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert refused == ["connections"]
    release.set()
    assert await asyncio.gather(*busy) == [200, 200, 200]
    # Room again once one of them is idle.
    again = await asyncio.open_connection("127.0.0.1", port)
    assert await ask(*again, "/e") == 200
    for _, w in [*opened, fourth, again]:
        w.close()
    await server.stop(1.0)


async def test_what_the_server_refuses_before_the_handler_is_told_by_status() -> None:
    refused: list[str] = []
    server = Server(echo, MAX_BODY, refused=refused.append)
    port = await server.listen_tcp("127.0.0.1", 0)
    await exchange(port, b"POST /a HTTP/1.1\r\ncontent-length: 1001\r\n\r\n")
    await exchange(port, b"GARBAGE\r\n\r\n")
    await exchange(port, post("/ok", b""))
    assert refused == ["413", "400"]
    await server.stop(1.0)


async def test_a_request_that_stopped_arriving_gives_its_place_to_a_new_connection_with_a_408(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(wire, "STALLED", 0.3)
    refused: list[str] = []
    server = Server(echo, MAX_BODY, max_connections=1, refused=refused.append)
    port = await server.listen_tcp("127.0.0.1", 0)
    stalled_reader, stalled_writer = await asyncio.open_connection("127.0.0.1", port)
    stalled_writer.write(b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc")  # and nothing more
    await wait_for(lambda: any(c.reading for c in server.connections), 5)  # its head is read, its body waited for
    assert await exchange(port, post("/b", b"")) == []  # not stalled long enough yet: the new one is reset
    await asyncio.sleep(0.3)  # time passing is what is tested: the body stalls past STALLED
    assert [a[0] for a in await exchange(port, post("/c", b""))] == [200]
    head = await asyncio.wait_for(stalled_reader.read(), 2)
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
    assert refused == ["connections", "408"]
    stalled_writer.close()
    await server.stop(1.0)


async def test_a_caller_that_hangs_up_cancels_its_request_whether_it_closes_or_resets() -> None:
    started, outcome = asyncio.Event(), []

    async def held(request: Request) -> Response:
        started.set()
        try:
            await asyncio.sleep(0.5)  # simulated work
        except asyncio.CancelledError:
            outcome.append(f"cancelled {request.path}")
            raise
        outcome.append(f"finished {request.path}")
        return json_response({"path": request.path})

    server = Server(held, MAX_BODY)
    port = await server.listen_tcp("127.0.0.1", 0)
    for done, path in enumerate(("/closed", "/reset", "/kept"), start=1):
        started.clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post(path, b""))
        await asyncio.wait_for(started.wait(), 5)
        if path == "/closed":
            writer.close()  # FIN, as Envoy closes an upstream connection to abort its request
        elif path == "/reset":
            writer.transport.abort()  # RST
        else:
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200 ")
            writer.close()
        await wait_for(lambda n=done: len(outcome) == n, 5)  # the handler was cancelled or finished
    assert outcome == ["cancelled /closed", "cancelled /reset", "finished /kept"]
    await server.stop(1.0)


ANSWERABLE = {200, 400, 404, 405, 408, 413, 422, 431, 500, 501, 505}


def mutated(rng: random.Random) -> tuple[bytes, bytes | None]:
    """A request, mutated or not, and the body an echo must answer with (None: any answer, or none)."""
    body = rng.randbytes(rng.randrange(0, 300)).hex().encode()
    good = post("/m", body)
    kind = rng.randrange(9)
    if kind == 0:
        return good, body
    if kind == 1:  # bytes changed at random
        raw = bytearray(good)
        for _ in range(rng.randrange(1, 6)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw), None
    if kind == 2:  # bytes inserted
        at = rng.randrange(len(good))
        return good[:at] + rng.randbytes(rng.randrange(1, 40)) + good[at:], None
    if kind == 3:  # cut short, or a range taken out
        at = rng.randrange(len(good))
        return (good[:at], None) if rng.random() < 0.5 else (good[:at] + good[at + rng.randrange(1, 30) :], None)
    if kind == 4:  # lengths that disagree, or are not numbers
        length = rng.choice(["-1", "1e3", "0x10", " 5", "99999999999999999999", str(len(body) + 3)])
        return (
            f"POST /m HTTP/1.1\r\ncontent-length: {len(body)}\r\ncontent-length: {length}\r\n\r\n".encode() + body,
            None,
        )
    if kind == 5:  # chunks of random (often wrong) sizes
        chunks = b"".join(
            f"{rng.randrange(0, 40):x}\r\n".encode() + rng.randbytes(rng.randrange(0, 40)) + b"\r\n"
            for _ in range(rng.randrange(1, 5))
        )
        return b"POST /m HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n", None
    if kind == 6:  # control characters and non-ASCII in a header
        value = bytes(rng.choice([0, 10, 13, 127, 200, 255, 65]) for _ in range(rng.randrange(1, 10)))
        return b"POST /m HTTP/1.1\r\nx-h: " + value + f"\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body, None
    if kind == 7:  # two requests, the second one mutated
        return good + mutated(rng)[0], None
    return rng.randbytes(rng.randrange(1, 500)), None


def whole(raw: bytes) -> bool:
    """Does `raw` hold one complete answer (head and its content-length of body)?"""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    lengths = [x.split(b":", 1)[1] for x in head.split(b"\r\n")[1:] if x.lower().startswith(b"content-length:")]
    return bool(sep) and bool(lengths) and len(rest) >= int(lengths[0])


def answers_in(raw: bytes) -> list[tuple[int, bytes]]:
    """The answers in what the server sent; AssertionError if it is not well-formed HTTP/1.1."""
    found = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, raw[:200]
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 "), lines[0]
        length = int(next(x.split(":", 1)[1] for x in lines[1:] if x.lower().startswith("content-length:")))
        found.append((int(lines[0].split(" ")[1]), rest[:length]))
        raw = rest[length:]
    return found


async def test_two_thousand_mutated_requests_get_well_formed_answers_and_the_server_stays_up() -> None:
    rng = random.Random(1414)  # fixed: a failure can be replayed
    seen: list[bytes] = []

    async def checked_echo(request: Request) -> Response:
        seen.append(request.body)
        return Response(200, request.body)

    server = Server(checked_echo, MAX_BODY)
    port = await server.listen_tcp("127.0.0.1", 0)

    async def one(raw: bytes, want: bytes | None) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        got = b""
        # A mutated request may be incomplete, which the server waits for: 0.3 s of silence ends the read. A good
        # one is read until its answer is whole (a busy machine can take longer than 0.3 s to give it).
        idle = 0.3 if want is None else 10
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(65536), idle):
                got += chunk
                if want is not None and whole(got):
                    break
        writer.close()
        answers = answers_in(got)
        assert {status for status, _ in answers} <= ANSWERABLE, (raw[:200], answers)
        if want is not None:
            assert answers == [(200, want)], raw[:200]

    cases = [mutated(rng) for _ in range(2000)]
    for start in range(0, len(cases), 100):
        await asyncio.gather(*(one(raw, want) for raw, want in cases[start : start + 100]))
    assert sum(want is not None for _, want in cases) > 150  # the good ones were among them, and answered right
    assert all(len(body) <= MAX_BODY for body in seen)
    for _ in range(50):  # every connection gone once its client closed
        if not server.connections:
            break
        await asyncio.sleep(0.05)
    assert not server.connections
    assert [a[0] for a in await exchange(port, post("/after", b"ok"))] == [200]
    await server.stop(1.0)


def test_a_pipelines_limit_told_with_the_request_only_ever_lowers_the_servers() -> None:
    from multidict import CIMultiDict

    from runtime_sdk.http1 import body_limit

    def told(value: str) -> int:
        return body_limit(CIMultiDict({"x-mll-max-body": value}), 1000)

    assert told("10") == 10 and told("5000") == 1000  # a caller cannot raise it
    assert told("abc") == told("-5") == told("1e3") == told("9" * 40) == 1000  # not a plain number: ignored
    assert told("\xb2") == told("\u0661") == told("") == 1000  # digits to str.isdigit, not to int()
    assert body_limit(CIMultiDict(), 1000) == 1000


async def test_a_keep_alive_connection_left_idle_is_closed_and_a_busy_one_is_not() -> None:
    server = Server(echo, MAX_BODY, idle_seconds=0.4)
    port = await server.listen_tcp("127.0.0.1", 0)
    try:
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        idle_writer.write(post("/a", b"1"))
        await asyncio.wait_for(idle_reader.readuntil(b"\r\n\r\n"), 5)
        # A request begun and not finished: not idle, however long its body takes (the 408 shedding is separate).
        busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port)
        busy_writer.write(b"POST /b HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\na")
        assert (await asyncio.wait_for(idle_reader.read(), 5)).endswith(b"}")  # the rest of its answer, then EOF
        assert idle_reader.at_eof()
        busy_writer.write(b"b")
        head = await asyncio.wait_for(busy_reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        idle_writer.close()
        busy_writer.close()
    finally:
        await server.stop(1.0)


def framed_by_us(raw: bytes) -> bytes | None:
    """The body of the first request the runtime's server frames in `raw` followed by the peer's close (None: no
    request: refused, or still incomplete when the bytes end)."""
    connection = wire._Connection(Server(echo, MAX_BODY))
    connection.buffer = bytearray(raw)
    try:
        reading = connection._head()
        return reading.request().body if reading is not None and connection._body(reading) else None
    except BadRequest:
        return None


def framed_by_h11(raw: bytes) -> bytes | None:
    """The same, as h11 (the reference) frames it."""
    connection, body = h11.Connection(h11.SERVER), b""
    try:
        connection.receive_data(raw)
        connection.receive_data(b"")  # the peer closes
        while True:
            event = connection.next_event()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return body
            elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return None
    except h11.RemoteProtocolError:
        return None


RFC9110_METHODS = {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH"}


def stricter_on_purpose(raw: bytes) -> str:
    """Why the runtime refuses a request h11 takes, where it does so on purpose ("": it does not)."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    request_line, _, fields = head.partition(b"\r\n")
    parts = request_line.split(b" ")
    if b"\n" in head.replace(b"\r\n", b""):
        return "a bare LF in the head (h11 reads it as a line end; a way to smuggle a header past other parsers)"
    if any((b < 32 and b != 9) or b == 127 for line in fields.split(b"\r\n") for b in line):
        return "a control character in a header (RFC 9110, 5.5; Envoy refuses them too)"
    if len(parts) == 3 and not parts[1].startswith(b"/"):
        return "a request target that is not a path (its callers send origin-form only)"
    if len(parts) == 3 and parts[0] not in RFC9110_METHODS:
        return "a method llhttp does not know (h11 takes any token; a runtime serves GET, HEAD and POST)"
    if len(parts) == 3 and parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") and b"\r\nhost:" not in head.lower():
        return "HTTP/1.2 read as 1.1, which needs a Host (h11 asks it of 1.1 only)"
    return ""


def test_ten_thousand_mutated_requests_are_framed_as_h11_frames_them() -> None:
    """A differential fuzz test: whether a request is taken and with which body, ours (llhttp, through httptools,
    and wire.py's framing) against h11's reading. Where they differ, ours refuses what h11 takes, each case for
    one of the reasons stricter_on_purpose names; never the other way round, and never with another body."""
    rng, agreed, stricter = random.Random(41), 0, collections.Counter[str]()
    for _ in range(10_000):
        raw, _ = mutated(rng)
        ours, reference = framed_by_us(raw), framed_by_h11(raw)
        if ours == reference:
            agreed += 1
            continue
        assert ours is None and reference is not None, (raw[:200], ours, reference)
        why = stricter_on_purpose(raw)
        assert why, ("refused, and h11 takes it", raw[:300])
        stricter[why] += 1
    assert agreed >= 9_950, (agreed, stricter)
