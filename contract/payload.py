"""The one rule for what a stage receives and returns (a JSON object), how it is read and written on the data
path (`parse_object`, `encode`), and for text we show (`flat`).

JSON is read and written with orjson, which is 3-20x cheaper than the standard library on ML payloads (long
texts, arrays of numbers; docs/benchmarks.md, "Payload sizes"): at 8 MB the standard library's dumps and loads
were most of a stage's CPU. What orjson refuses goes to the standard library, so what it accepted before is
still accepted, read the same: a byte order mark, NaN and Infinity as numbers, lone surrogates in escapes,
nesting beyond orjson's 1,024 levels. Two differences, both where JSON itself has no answer (RFC 8259, 6):
an integer beyond 64 bits in a request is read as the nearest float (as JavaScript and most JSON readers do),
and a NaN or infinity in an answer is written as null (the standard library wrote `NaN`, which no strict
reader takes).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

# Body sizes (docs/architecture.md, "Payload sizes"). A pipeline's `max_body` (default DEFAULT_MAX_BODY, a large
# image) is enforced at the gateway (413 before any stage runs) and told to every stage's runtime with each
# request (x-mll-max-body); MAX_BODY_CEILING is the most any pipeline may set and what a runtime accepts from a
# caller that does not say (its --max-body default). Kafka clients are sized for the ceiling.
DEFAULT_MAX_BODY = 16 * 1024 * 1024
MAX_BODY_CEILING = 64 * 1024 * 1024
MIN_MAX_BODY = 1024
KAFKA_MESSAGE_MAX = MAX_BODY_CEILING + 64 * 1024  # a record's value plus its headers


class NotAnObject(ValueError):
    """A body that is not a JSON object; the message says what it is instead."""


def loads(body: bytes | bytearray | memoryview | str) -> Any:
    """JSON text read as the standard library reads it (raising its ValueError or RecursionError), by orjson
    where orjson can."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(bytes(body) if isinstance(body, memoryview) else body)


def parse_object(body: bytes | bytearray | memoryview | str | None) -> dict[str, Any]:
    if body is None:
        raise NotAnObject("the record has no value (a tombstone)")
    try:
        payload = loads(body)
    except ValueError as err:  # includes UnicodeDecodeError
        raise NotAnObject(f"body is not valid JSON: {err}") from err
    except RecursionError as err:
        raise NotAnObject("body is nested too deeply") from err
    if not isinstance(payload, dict):
        raise NotAnObject(f"body must be a JSON object, got {type(payload).__name__}")
    return payload


def encode(value: Any) -> bytes:
    """`value` as JSON bytes; TypeError, ValueError or RecursionError if JSON cannot hold it (as json.dumps).
    What orjson does not write (an integer beyond 64 bits, a lone surrogate, nesting beyond 254 levels, a type
    neither knows) goes to the standard library. orjson also writes dataclasses, datetimes, UUIDs and enums."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # orjson.JSONEncodeError is one
        return json.dumps(value).encode()


REASON_KEPT = 500  # characters of a reason we show (a dead-letter reason, a NACK quoted in a log)


def flat(text: str, limit: int = REASON_KEPT) -> str:
    """One line, no control characters, at most `limit` characters."""
    line = "".join(c if c.isprintable() else " " for c in text)
    return line if len(line) <= limit else line[: limit - 3] + "..."
