"""A package's declared contract: the manifest's `contract:` block, and its examples checked against it.

```yaml
contract:
  reads: {text: BYTES}
  answers:
    category: {type: BYTES, enum: [sports, tech, food]}   # the values it can answer (branch keys are checked)
    confidence: FP64
```

Read as a signature (`{"inputs": [...], "outputs": [...], "kind": "declared"}`, the
shape saved models' signatures have), which Apply checks pipelines against
(controlplane/pipeline/contracts.py). A contract its own examples contradict is
refused at build: an example request without a field the contract reads, an
expected answer with a field it does not answer, or with a value outside its enum.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from controlplane.pipeline.model import CONTRACT_TYPES as TYPES

MAX_FIELDS = 256  # a side
MAX_ENUM, MAX_ENUM_CHARS = 256, 64
MAX_EXAMPLE_LINES, MAX_EXAMPLE_LINE = 10_000, 1024 * 1024  # as `mllambda test` reads them
SHOWN = 10  # example problems named at once


def read_contract(raw: Any, problems: list[str]) -> dict[str, Any]:
    """`contract: {reads: {field: TYPE}, answers: {field: TYPE | {type, enum}}}` as a signature ({}: none)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or set(raw) - {"reads", "answers"}:
        problems.append("contract: a mapping with reads and answers, each {field: TYPE} (TYPE: FP64, BYTES, ANY ...)")
        return {}
    sides: dict[str, list[dict[str, Any]]] = {}
    for key, side in (("reads", "inputs"), ("answers", "outputs")):
        fields = raw.get(key) or {}
        if not isinstance(fields, dict) or len(fields) > MAX_FIELDS:
            problems.append(f"contract.{key}: a mapping of up to {MAX_FIELDS} fields to types")
            continue
        sides[side] = []
        for name, kind in fields.items():
            if not isinstance(name, str) or not 0 < len(name) <= 256 or not name.isprintable():
                problems.append(f"contract.{key}: {str(name)[:40]!r}: a printable field name of 1 to 256 characters")
                continue
            found = _field(name, kind, f"contract.{key}.{name}", problems)
            if found is not None:
                sides[side].append(found)
    return {**sides, "kind": "declared"} if sides else {}


def _field(name: str, kind: Any, path: str, problems: list[str]) -> dict[str, Any] | None:
    enum = None
    if isinstance(kind, dict):
        if set(kind) - {"type", "enum"} or "type" not in kind:
            problems.append(f"{path}: a type, or {{type: TYPE, enum: [values]}}")
            return None
        kind, enum = kind["type"], kind.get("enum")
    if kind not in TYPES:
        problems.append(f"{path}: {str(kind)[:20]!r} is not one of {', '.join(TYPES)}")
        return None
    field: dict[str, Any] = {"name": name, "datatype": str(kind), "shape": [-1]}
    if enum is not None:
        fits = isinstance(enum, list) and 0 < len(enum) <= MAX_ENUM
        if not fits or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in enum):
            problems.append(f"{path}.enum: a list of 1 to {MAX_ENUM} strings or integers")
            return None
        values = [str(v) for v in enum]
        if any(len(v) > MAX_ENUM_CHARS or not v.isprintable() for v in values):
            problems.append(f"{path}.enum: printable values of up to {MAX_ENUM_CHARS} characters")
            return None
        field["enum"] = sorted(set(values))
    return field


def example_problems(path: Path, signature: dict[str, Any]) -> list[str]:
    """Where the examples file at `path` contradicts the declared contract (at most SHOWN named)."""
    found: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as lines:
        for n, line in enumerate(lines, 1):
            if n > MAX_EXAMPLE_LINES or len(found) >= SHOWN:
                break
            try:
                example = json.loads(line[:MAX_EXAMPLE_LINE]) if line.strip() else None
            except ValueError:
                continue  # `mllambda test` reports it; here only what the contract says is judged
            if isinstance(example, dict):
                found += [f"examples line {n}: {why}" for why in _contradictions(example, signature)]
    return found[:SHOWN]


def _contradictions(example: dict[str, Any], signature: dict[str, Any]) -> list[str]:
    given = "request" in example
    request, expected = (example["request"], example.get("expected")) if given else (example, None)
    found = []
    if isinstance(request, dict):
        reads = [f["name"] for f in signature.get("inputs", [])]
        found += [f"the request has no {r!r}, which the contract reads" for r in reads if r not in request]
    if isinstance(expected, dict) and "outputs" in signature:  # expected: some of the answer's fields
        answers = {f["name"]: f.get("enum") for f in signature["outputs"]}
        for name, value in expected.items():
            enum = answers.get(name)
            if name not in answers:
                found.append(f"the expected answer has {str(name)[:40]!r}, which the contract does not answer")
            elif enum is not None and str(value) not in enum:
                found.append(f"{name} {str(value)[:40]!r} is not one of {enum[:10]}")
    return found
