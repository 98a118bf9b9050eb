"""HTTP/1.1 requests and answers as the runtime's server (wire.py) reads and writes them: parsing a request
head and its framing, building an answer's bytes. Pure functions over bytes; the connections are wire.py's.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, NamedTuple

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from contract import headers as h
from runtime_sdk.hop import JOINED, TOKEN, Message, TooManyFields, header_safe, read_head

_TARGET = re.compile(r"/[!-~]*")  # visible ASCII only: no space, control character or byte beyond
_LENGTH = re.compile(r"[0-9]{1,18}")
log = logging.getLogger("mllambda.runtime")


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: CIMultiDictProxy[str]
    body: bytes
    notes: dict[str, Any] = field(default_factory=dict)  # what one step of handling tells a later one


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class HttpError(Exception):
    """An answer a handler gives by raising: a 4xx with a JSON body saying what is wrong."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.response = json_response({"error": message, **extra}, status)


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(obj).encode(), {"content-type": "application/json", **(headers or {})})


class BadRequest(Exception):
    """A request the server answers itself, with `status`, and after which it closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Head(NamedTuple):
    method: str
    path: str
    query: str
    http10: bool
    message: Message  # its headers; a chunked body goes on through it
    parser: httptools.HttpRequestParser


def parse_head(head: bytes) -> Head:
    """A request's head through its blank line, read by llhttp (httptools); BadRequest if it is not HTTP/1.1.
    What a chunked body may hold (`message.limit`) is set once the headers are known (wire.py, body_limit)."""
    message = Message()
    parser = httptools.HttpRequestParser(message)
    parser.set_dangerous_leniencies(lenient_version=True)  # HTTP/1.2 is read as 1.1 (RFC 9110, 2.5); 2.0 is a 505
    try:
        read_head(parser, message, head)
    except TooManyFields as err:
        raise BadRequest(431, str(err)) from None
    except ValueError as err:
        raise BadRequest(400, f"not an HTTP/1.1 request: {err}") from None
    version = parser.get_http_version()
    if not version.startswith("1."):
        raise BadRequest(505, f"HTTP/{version[:8]} is not HTTP/1.1")
    target = message.url.decode("latin-1")
    if not _TARGET.fullmatch(target):
        raise BadRequest(400, "a request target that is not a path")
    path, _, query = target.partition("?")
    return Head(parser.get_method().decode("latin-1"), path, query, version == "1.0", message, parser)


def body_limit(headers: CIMultiDict[str], max_body: int) -> int:
    """The pipeline's limit (x-mll-max-body, set by the sidecar), where it is below the server's own."""
    said = headers.get(h.MAX_BODY, "")
    return min(int(said), max_body) if len(said) < 16 and _LENGTH.fullmatch(said) else max_body


def body_length(headers: CIMultiDict[str], max_body: int) -> int | None:
    """The body's length (None: chunked); BadRequest for a framing a peer must not send, 413 over `max_body`."""
    coding = headers.getall("transfer-encoding", [])
    lengths = set(headers.getall("content-length", []))
    if coding:
        if lengths:
            raise BadRequest(400, "both Content-Length and Transfer-Encoding")
        if [c.strip().lower() for c in ",".join(coding).split(",")] != ["chunked"]:
            raise BadRequest(501, "only chunked transfer coding is accepted")
        return None
    if not lengths:
        return 0
    if len(lengths) > 1 or not _LENGTH.fullmatch(next(iter(lengths))):
        raise BadRequest(400, "a Content-Length that is not one number")
    length = int(next(iter(lengths)))
    if length > max_body:
        raise BadRequest(413, f"body too large: the limit is {max_body} bytes")
    return length


_dates: list[Any] = [0, ""]


def _date() -> str:
    now = int(time.time())
    if _dates[0] != now:
        _dates[0], _dates[1] = now, formatdate(now, usegmt=True)
    return str(_dates[1])


def response_bytes(response: Response, close: bool, head: bool = False) -> list[bytes]:
    """The answer on the wire, as the writes to make: head and body in one, or a large body after its head
    (not copied into one more buffer). A header value with a line break would forge headers: a 500 instead."""
    if not all(header_safe(v) and TOKEN.fullmatch(k) for k, v in response.headers.items()):
        log.error("an answer with a header that cannot be sent: %r", list(response.headers)[:10])
        response = json_response({"error": "the runtime built an answer with a malformed header"}, 500)
    try:
        reason = HTTPStatus(response.status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {response.status} {reason}\r\n"]
    for name, value in response.headers.items():
        if name.lower() not in ("content-length", "transfer-encoding", "connection", "date"):
            lines.append(f"{name}: {value}\r\n")
    lines.append(f"content-length: {len(response.body)}\r\ndate: {_date()}\r\n")
    lines.append("connection: close\r\n\r\n" if close else "\r\n")
    start = "".join(lines).encode("latin-1")
    if head or not response.body:  # HEAD: the length it would have, and no body (it would start the next answer)
        return [start]
    return [start + response.body] if len(response.body) <= JOINED else [start, response.body]
