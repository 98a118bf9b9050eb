"""What a replay reads and reports: recorded requests from the payload log, and each answer judged against its record.

Pure: no network. The payload log (runtime_sdk/payload_log.py) holds one JSON
object per line; a line that does not parse, is not such a record, is over
MAX_LINE, or whose request was cut (`truncated`) is skipped and counted by
reason. An answer is *equal* to its record (same status, every field the same,
numbers within a relative and absolute tolerance), *changed* (the fields that
differ are counted by path), or *failed* (no answer, or a 5xx where the record
had none). Tallies are kept per change of the served chain (the stages whose
model version differs from the recorded one), so a report says which variant
changed what.
"""

from __future__ import annotations

import json
import math
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

MAX_LINE = 1 << 20  # bytes of one record line (bodies are cut at 64 KiB each when written)
MAX_RECORDS = 100_000  # --last at most
MAX_FIELDS = 50  # changed field paths told apart per report (the rest: "(other fields)")
MAX_CHAINS = 30  # chain changes told apart per report (the rest: "(other chains)")
MAX_EXAMPLES = 5  # changed answers shown whole
EXAMPLE_CHARS = 2_000
SAME = "same models"


@dataclass(frozen=True)
class Recorded:
    request_id: str
    at: str
    request: Any
    response: Any
    status: int
    latency_ms: float
    served: tuple[str, ...]
    protocol: str = "json"  # "oip": sent to the pipeline's OIP path


@dataclass
class LogRead:
    records: list[Recorded]
    lines: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


def _record(raw: Any, pipeline: str) -> Recorded | str:
    """A log line's object as a record, or why it is skipped."""
    if not isinstance(raw, dict):
        return "not a record"
    try:
        status, latency, served = int(raw["status"]), float(raw["latency_ms"]), raw["served"]
        request, response, name = raw["request"], raw["response"], raw["pipeline"]
    except (KeyError, TypeError, ValueError):
        return "not a record"
    if name != pipeline:
        return "another pipeline"
    if not isinstance(served, list) or not all(isinstance(s, str) for s in served):
        return "not a record"
    if isinstance(request, dict) and request.get("truncated") is True:
        return "request cut when logged (over 64 KiB)"
    protocol = "oip" if raw.get("protocol") == "oip" else "json"
    if protocol == "oip" and not isinstance(request, dict):
        return "binary OIP request (the log keeps it as text)"
    return Recorded(
        str(raw.get("request_id", "")),
        str(raw.get("at", "")),
        request,
        response,
        status,
        latency,
        tuple(served),
        protocol,
    )


def _lines(stream: TextIO) -> Iterator[str | None]:
    """Each line, or None for one over MAX_LINE (read past, never held whole)."""
    while True:
        line = stream.readline(MAX_LINE + 1)
        if not line:
            return
        if len(line) > MAX_LINE and not line.endswith("\n"):
            while (rest := stream.readline(MAX_LINE)) and not rest.endswith("\n"):
                pass
            yield None
            continue
        yield line


def read_log(paths: Iterable[Path], pipeline: str, last: int = 1000, since: str = "") -> LogRead:
    """The newest `last` usable records of `pipeline` in `paths` (oldest file first), at or after `since`."""
    kept: deque[Recorded] = deque(maxlen=min(max(last, 1), MAX_RECORDS))
    read = LogRead([])
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as stream:
            for line in _lines(stream):
                read.lines += 1
                if line is None:
                    read.skipped[f"over {MAX_LINE} bytes"] += 1
                    continue
                if not line.strip():
                    read.lines -= 1
                    continue
                try:
                    found = _record(json.loads(line), pipeline)
                except ValueError:
                    found = "not JSON (corrupt or cut short)"
                if isinstance(found, str):
                    read.skipped[found] += 1
                elif since and found.at < since:
                    read.skipped["before --since"] += 1
                else:
                    if len(kept) == kept.maxlen:
                        read.skipped["older than --last"] += 1
                    kept.append(found)
    read.records = list(kept)
    return read


def differences(recorded: Any, answered: Any, tolerance: float, path: str = "") -> list[str]:
    """The field paths where two JSON values differ (numbers within `tolerance`, relative or absolute)."""
    if isinstance(recorded, dict) and isinstance(answered, dict):
        found = []
        for key in [*recorded, *(k for k in answered if k not in recorded)]:
            where = f"{path}.{key}" if path else str(key)
            if key not in recorded or key not in answered:
                found.append(where)
            else:
                found += differences(recorded[key], answered[key], tolerance, where)
        return found
    if isinstance(recorded, list) and isinstance(answered, list):
        if len(recorded) != len(answered):
            return [path or "(answer)"]
        return [
            d
            for i, (a, b) in enumerate(zip(recorded, answered, strict=True))
            for d in differences(a, b, tolerance, f"{path}[{i}]")
        ]
    if _number(recorded) and _number(answered):
        same = math.isclose(recorded, answered, rel_tol=tolerance, abs_tol=tolerance)
        return [] if same else [path or "(answer)"]
    return [] if recorded == answered and type(recorded) is type(answered) else [path or "(answer)"]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _list_of(served: str | Iterable[str]) -> tuple[str, ...]:
    parts = served.split(",") if isinstance(served, str) else served
    return tuple(p.strip() for p in parts if p.strip())


def chain_change(recorded: Iterable[str], answered: str | Iterable[str]) -> str:
    """`stage: model:v1 -> model:v2` for each stage served by another model version ("same models": none)."""
    before = dict(s.split("=", 1) for s in recorded if "=" in s)
    after = dict(s.split("=", 1) for s in _list_of(answered) if "=" in s)
    stages = [*before, *(s for s in after if s not in before)]
    changed = [f"{s}: {before.get(s, '-')} -> {after.get(s, '-')}" for s in stages if before.get(s) != after.get(s)]
    return "; ".join(changed) or SAME


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: no answer (error says why)
    body: Any
    served: str
    latency_ms: float
    error: str = ""


@dataclass
class Counts:
    requests: int = 0
    equal: int = 0
    changed: int = 0
    failed: int = 0

    def add(self, outcome: str) -> None:
        self.requests += 1
        setattr(self, outcome, getattr(self, outcome) + 1)

    def as_dict(self) -> dict[str, Any]:
        share = (lambda n: round(n / self.requests, 4)) if self.requests else (lambda n: 0.0)
        return {
            **self.__dict__,
            "equal_share": share(self.equal),
            "changed_share": share(self.changed),
            "failed_share": share(self.failed),
        }


@dataclass
class Tally:
    """The running report of one replay."""

    tolerance: float
    total: Counts = field(default_factory=Counts)
    chains: dict[str, Counts] = field(default_factory=dict)
    fields: Counter[str] = field(default_factory=Counter)
    failed_by: Counter[str] = field(default_factory=Counter)
    recorded_ms: list[float] = field(default_factory=list)
    answered_ms: list[float] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def judge(self, record: Recorded, answer: Answer) -> str:
        """Count one answer; returns its outcome: equal, changed or failed."""
        chain = chain_change(record.served, answer.served) if answer.served else "(no answer)"
        if chain not in self.chains and len(self.chains) >= MAX_CHAINS:
            chain = "(other chains)"
        if answer.status is None or (answer.status >= 500 and record.status < 500):
            outcome = "failed"
            self.failed_by[answer.error or f"status {answer.status}"] += 1
        else:
            diff = ["(status)"] if answer.status != record.status else []
            diff += differences(record.response, answer.body, self.tolerance)
            outcome = "changed" if diff else "equal"
            for path in dict.fromkeys(diff):
                self.fields[path if path in self.fields or len(self.fields) < MAX_FIELDS else "(other fields)"] += 1
            if diff and len(self.examples) < MAX_EXAMPLES:
                self.examples.append(_example(record, answer, diff))
            self.answered_ms.append(answer.latency_ms)
        self.recorded_ms.append(record.latency_ms)
        self.total.add(outcome)
        self.chains.setdefault(chain, Counts()).add(outcome)
        return outcome

    def report(self) -> dict[str, Any]:
        chains = sorted(self.chains.items(), key=lambda i: -i[1].requests)
        return {
            **self.total.as_dict(),
            "tolerance": self.tolerance,
            "by_chain": [{"chain": c, **n.as_dict()} for c, n in chains],
            "changed_fields": dict(self.fields.most_common()),
            "failed_by": dict(self.failed_by.most_common()),
            "latency_ms": {"recorded": _quantiles(self.recorded_ms), "candidate": _quantiles(self.answered_ms)},
            "examples": self.examples,
        }


def _example(record: Recorded, answer: Answer, diff: list[str]) -> dict[str, Any]:
    def cut(value: Any) -> Any:
        text = json.dumps(value)
        return value if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "..."

    return {
        "request_id": record.request_id,
        "fields": diff[:10],
        "request": cut(record.request),
        "recorded": cut(record.response),
        "candidate": cut(answer.body),
    }


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50": at(0.50), "p99": at(0.99)}


def passes(report: Mapping[str, Any], max_changed: float, max_failed: float) -> bool:
    """Whether a report is within the limits (shares of its requests); an empty replay never passes."""
    return bool(report.get("requests")) and (
        float(report.get("changed_share", 1)) <= max_changed and float(report.get("failed_share", 1)) <= max_failed
    )
