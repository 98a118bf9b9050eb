"""The one rule for what a stage receives and returns (a JSON object), and for text we show (`flat`)."""

from __future__ import annotations

import json
from typing import Any

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


def parse_object(body: bytes | str | None) -> dict[str, Any]:
    if body is None:
        raise NotAnObject("the record has no value (a tombstone)")
    try:
        payload = json.loads(body)
    except ValueError as err:  # includes UnicodeDecodeError
        raise NotAnObject(f"body is not valid JSON: {err}") from err
    except RecursionError as err:
        raise NotAnObject("body is nested too deeply") from err
    if not isinstance(payload, dict):
        raise NotAnObject(f"body must be a JSON object, got {type(payload).__name__}")
    return payload


REASON_KEPT = 500  # characters of a reason we show (a dead-letter reason, a NACK quoted in a log)


def flat(text: str, limit: int = REASON_KEPT) -> str:
    """One line, no control characters, at most `limit` characters."""
    line = "".join(c if c.isprintable() else " " for c in text)
    return line if len(line) <= limit else line[: limit - 3] + "..."
