"""`python -m runtime_sdk.examples FILE`: a package's examples through its own predict, in its own environment.

Run by `mllambda test M:V` in the package's folder. FILE holds JSON lines: a request
object, or `{"request": {...}, "expected": {...}, "tolerance": 1e-6}`. Each answer is
compared with its expected one (numbers within the relative tolerance, everything
else equal) and one JSON line per example is printed: `{"n", "status": "passed" |
"failed" | "ran" | "error", "differences" or "error"}`. Exit 1 if any failed.
"""

from __future__ import annotations

import asyncio
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


def main(argv: list[str]) -> int:
    meta = json.loads(Path(".mllambda/package.json").read_text())
    lines = Path(argv[0]).read_text(errors="replace").splitlines()
    return asyncio.run(run(meta, lines))


if __name__ == "__main__":
    sys.path.insert(0, ".")  # the package's root: its entry imports from there
    sys.exit(main(sys.argv[1:]))
