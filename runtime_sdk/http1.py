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
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from contract import headers as h
from runtime_sdk.hop import JOINED, TOKEN, header_safe

_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")  # a token: an unknown method is the handler's 405
_VERSION = re.compile(r"HTTP/1\.[0-9]")
_TARGET = re.compile(r"/[!-~]*")  # visible ASCII only: no space, control character or byte beyond
_LENGTH = re.compile(r"[0-9]{1,18}")
MAX_HEADERS = 100  # header lines of a request (its head is bounded in bytes too: wire.MAX_HEAD)
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


def parse_head(head: bytes) -> tuple[str, str, str, bool, CIMultiDict[str]]:
    """(method, path, query, HTTP/1.0?, headers) of a request head without its blank line; BadRequest if malformed."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _METHOD.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        raise BadRequest(400, "not an HTTP request line")
    if not _VERSION.fullmatch(parts[2]):  # HTTP/1.2 is read as 1.1 (RFC 9110, 2.5)
        raise BadRequest(505 if parts[2].startswith("HTTP/") else 400, f"{parts[2][:20]!r} is not HTTP/1.1")
    if len(lines) > MAX_HEADERS + 1:
        raise BadRequest(431, f"more than {MAX_HEADERS} header lines")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not TOKEN.fullmatch(name) or not header_safe(value):  # a bare CR or LF, a NUL
            raise BadRequest(400, "a header line that is not `name: value`")
        headers.add(name, value.strip(" \t"))
    path, _, query = parts[1].partition("?")
    return parts[0], path, query, parts[2] == "HTTP/1.0", headers


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
