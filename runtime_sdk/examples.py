"""`python -m runtime_sdk.examples FILE`: a package's examples through its own predict, in its own environment.

Run by `mllambda test M:V` in the package's folder. FILE holds JSON lines: a request
object, or `{"request": {...}, "expected": {...}, "tolerance": 1e-6}`. Each answer is
compared with its expected one (numbers within the relative tolerance, everything
else equal) and one JSON line per example is printed: `{"n", "status": "passed" |
"failed" | "ran" | "error", "differences" or "error"}`. Exit 1 if any failed.

`--infer FILE --entry M:F [--loader M:F]`: run by `mllambda build` for a package with
examples and no contract, as MLflow infers a signature from an input example. It
prints one JSON line, a contract (`{"inputs", "outputs", "kind"}`) or `{}` when an
example fails or none is an object: reads are the fields without which the first
request's predict raises (a field read with a default is not one: it need not be
provided); answers are the fields every example's answer has.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import math
import sys
from pathlib import Path
from typing import Any

from runtime_sdk.serve import load_callable

MAX_EXAMPLES = 10_000
MAX_LINE = 1024 * 1024
MAX_DIFFERENCES = 10


def differences(got: Any, want: Any, tolerance: float, path: str = "") -> list[str]:
    """Where `got` is not `want`: `path: got != want` (numbers: within `tolerance` of each other, relatively)."""
    if isinstance(want, dict) and isinstance(got, dict):
        found = [f"{path}.{k}: missing" if path else f"{k}: missing" for k in want if k not in got]
        for key in want:
            if key in got:
                found += differences(got[key], want[key], tolerance, f"{path}.{key}" if path else str(key))
        return found
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{path}: {len(got)} items, expected {len(want)}"]
        return [
            d
            for i, (g, w) in enumerate(zip(got, want, strict=True))
            for d in differences(g, w, tolerance, f"{path}[{i}]")
        ]
    numbers = (int, float)
    if (
        isinstance(want, numbers)
        and isinstance(got, numbers)
        and not isinstance(want, bool)
        and not isinstance(got, bool)
    ):
        if math.isclose(got, want, rel_tol=tolerance, abs_tol=tolerance):
            return []
    elif got == want:
        return []
    return [f"{path or '(answer)'}: {json.dumps(got)[:80]} != {json.dumps(want)[:80]}"]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


async def run(meta: dict[str, Any], lines: list[str]) -> int:
    predict = load_callable(meta["entry"])
    if meta.get("loader"):
        load_callable(meta["loader"])()
    failed = 0
    for n, line in enumerate(lines[:MAX_EXAMPLES], 1):
        if not line.strip():
            continue
        try:
            if len(line) > MAX_LINE:
                raise ValueError(f"over {MAX_LINE} bytes")
            example = json.loads(line)
            given = "request" in example and isinstance(example, dict)
            request = example["request"] if given else example
            answer = predict(request)
            if inspect.isawaitable(answer):
                answer = await answer
        except Exception as err:  # the model's error or a line that does not parse: reported, the rest go on
            failed += 1
            print(json.dumps({"n": n, "status": "error", "error": f"{type(err).__name__}: {str(err)[:300]}"}))
            continue
        if not given or "expected" not in example:
            print(json.dumps({"n": n, "status": "ran", "answer": answer}, default=str)[:2000])
            continue
        found = differences(answer, example["expected"], float(example.get("tolerance", 1e-6)))
        failed += bool(found)
        print(json.dumps({"n": n, "status": "failed" if found else "passed", "differences": found[:MAX_DIFFERENCES]}))
    if len(lines) > MAX_EXAMPLES:
        print(
            json.dumps(
                {"n": MAX_EXAMPLES + 1, "status": "error", "error": f"only the first {MAX_EXAMPLES} examples run"}
            )
        )
    return 1 if failed else 0


MAX_INFERRED = 64  # fields a side; examples run to infer a contract
MAX_PROBED = 64  # fields of the first request each left out once


async def _answer(predict: Any, request: Any) -> Any:
    answer = predict(request)
    return await answer if inspect.isawaitable(answer) else answer


def _datatype(values: list[Any]) -> str:
    """The contract type the examples' values have in common (ANY when they differ or are not scalars)."""
    if all(isinstance(v, bool) for v in values):
        return "BOOL"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "INT64"
    if all(_number(v) for v in values):
        return "FP64"
    return "BYTES" if all(isinstance(v, str) for v in values) else "ANY"


async def infer(meta: dict[str, Any], lines: list[str]) -> dict[str, Any]:
    """A contract from the examples through predict (see the module's note); {} when it cannot be told."""
    predict = load_callable(meta["entry"])
    if meta.get("loader"):
        load_callable(meta["loader"])()
    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for line in [line for line in lines if line.strip()][:MAX_INFERRED]:
        try:
            example = json.loads(line[:MAX_LINE])
            request = example["request"] if isinstance(example, dict) and "request" in example else example
            answer = await _answer(predict, copy.deepcopy(request))  # a predict that changes its payload
        except Exception:
            return {}  # `mllambda test` says why; a contract is not guessed from examples that fail
        if not isinstance(request, dict) or not isinstance(answer, dict):
            return {}
        pairs.append((request, answer))
    if not pairs:
        return {}
    first = pairs[0][0]
    reads = []
    for name in list(first)[:MAX_PROBED]:
        try:
            await _answer(predict, copy.deepcopy({k: v for k, v in first.items() if k != name}))
        except Exception:
            reads.append(name)  # without it, predict fails: it is read
    answers = [k for k in pairs[0][1] if all(k in a for _, a in pairs)][:MAX_INFERRED]

    def fields(names: list[str], side: int) -> list[dict[str, Any]]:
        found = []
        for name in names:
            values = [pair[side][name] for pair in pairs if name in pair[side]]
            found.append({"name": name, "datatype": _datatype(values), "shape": [-1]})
        return found

    return {"inputs": fields(reads, 0), "outputs": fields(answers, 1), "kind": f"inferred from {len(pairs)} examples"}


def main(argv: list[str]) -> int:
    if argv[:1] == ["--infer"]:  # --infer FILE --entry M:F [--loader M:F]
        flags = dict(zip(argv[2::2], argv[3::2], strict=False))
        meta = {"entry": flags["--entry"], "loader": flags.get("--loader", "")}
        lines = Path(argv[1]).read_text(errors="replace").splitlines()
        print(json.dumps(asyncio.run(infer(meta, lines))))
        return 0
    meta = json.loads(Path(".mllambda/package.json").read_text())
    lines = Path(argv[0]).read_text(errors="replace").splitlines()
    return asyncio.run(run(meta, lines))


if __name__ == "__main__":
    sys.path.insert(0, ".")  # the package's root: its entry imports from there
    sys.exit(main(sys.argv[1:]))
