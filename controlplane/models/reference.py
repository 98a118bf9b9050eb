"""A model version's reference data (its manifest's `reference:`): a sample of what it was trained or validated
on, as JSON lines, profiled by the runtime's own code (runtime_sdk/profiles.py) into a drift baseline.

Each line is a request object, or `{"request": {...}, "answer": {...}}` when the sample carries the model's
answers too (then its outputs are profiled as well, and a version's answers can drift from them). Checked at
build (every bad line named, SHOWN at most) so a stored package never holds a reference that does not read.
Bounded: MAX_LINES lines of at most MAX_LINE bytes, MAX_BYTES in all; the profile itself is bounded as the
runtime's is (64 fields a side, fixed-size sketches).
"""

from __future__ import annotations

import json
from typing import Any

MAX_LINES = 100_000
MAX_LINE = 64 * 1024
MAX_BYTES = 64 * 1024 * 1024
SHOWN = 10
Record = tuple[dict[str, Any], dict[str, Any] | None]


class BadReference(Exception):
    """Reference data that cannot be a baseline (the message names the lines)."""


def read_records(text: str) -> tuple[list[Record], list[str]]:
    """The (request, answer or None) of each line; problems as `reference line N: why`."""
    records: list[Record] = []
    problems: list[str] = []
    if len(text) > MAX_BYTES:
        return [], [f"reference: {len(text):,} bytes, over {MAX_BYTES:,}: sample it"]
    lines = text.splitlines()
    if len(lines) > MAX_LINES:
        return [], [f"reference: {len(lines):,} lines, over {MAX_LINES:,}: sample it"]
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        why = ""
        if len(line) > MAX_LINE:
            why = f"{len(line):,} characters, over {MAX_LINE:,}"
        else:
            try:
                record = json.loads(line)
            except ValueError as err:
                why = f"not JSON ({err})"
            else:
                why = _record(record, records)
        if why:
            problems.append(f"reference line {n}: {why}")
    if not records and not problems:
        problems.append("reference: no records")
    if len(problems) > SHOWN:
        problems = [*problems[:SHOWN], f"reference: {len(problems) - SHOWN} more lines like these"]
    return records, problems


def _record(record: Any, into: list[Record]) -> str:
    if not isinstance(record, dict):
        return "not a JSON object"
    if set(record) <= {"request", "answer"} and "request" in record:
        request, answer = record["request"], record.get("answer")
        if not isinstance(request, dict) or not (answer is None or isinstance(answer, dict)):
            return "request and answer must be JSON objects"
        into.append((request, answer))
    else:
        into.append((record, None))
    return ""


def profile_window(text: str) -> dict[str, Any]:
    """The reference data as one profile window, as a runtime exports it (BadReference if it does not read)."""
    from runtime_sdk.profiles import Window  # datasketches and numpy: only for this, not for every `mllambda build`

    records, problems = read_records(text)
    if problems:
        raise BadReference("; ".join(problems))
    window = Window(0)
    for request, answer in records:
        window.requests += 1
        window.add("inputs", request)
        if answer is not None:
            window.add("outputs", answer)
    return window.export()
