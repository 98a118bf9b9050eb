"""Adaptive batching: a vectorised scikit-learn model at 64 concurrent clients, with and without batching.

One stack serves the same model twice, each a one-stage pipeline behind the gateway and its sidecar:
  single:  predict(dict) -> dict, one model call per request
  batched: predict_batch(list[dict]) -> list[dict], `--max-batch 64 --max-wait-ms 5`
The model is a 100-tree random forest on 20 features (trained at import, same seed in both). Load:
hey, 64 connections, 8 s, closed loop; the two in turns within each run; medians of the runs.
Run: .venv/bin/python -m bench.batching [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

from bench.common import median, running_stack

FEATURES = 20
PIPELINES = ("single", "batched")


@cache
def forest() -> Any:
    import numpy as np
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(7)
    x = rng.normal(size=(2000, FEATURES))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    return RandomForestClassifier(n_estimators=100, max_depth=8, random_state=7).fit(x, y)


def load() -> None:
    forest()


def predict(payload: dict[str, Any]) -> dict[str, Any]:
    return predict_batch([payload])[0]


def predict_batch(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    probabilities = forest().predict_proba([p["x"] for p in payloads])
    return [{"p": round(float(row[1]), 4)} for row in probabilities]


def stack() -> dict[str, Any]:
    base = {"version": "v1", "loader": "bench.batching:load"}
    return {
        "name": "bench-batching",
        "security": "plaintext",
        "runtimes": [
            {"model": "single", **base, "target": "bench.batching:predict"},
            {"model": "batched", **base, "target": "bench.batching:predict_batch", "args": ["--max-batch=64"]},
        ],
        "pipelines": [
            {"name": name, "stages": [{"name": "forest", "variants": [{"model": name, "version": "v1"}]}]}
            for name in PIPELINES
        ],
    }


def hey(url: str, body: Path) -> dict[str, float]:
    out = subprocess.run(
        ["hey", "-z", "8s", "-c", "64", "-m", "POST", "-T", "application/json", "-D", str(body), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        found[f"p{pct}"] = float(re.search(rf"{pct}%+ in ([\d.]+) secs", out).group(1)) * 1000  # type: ignore[union-attr]
    codes = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", out))
    assert set(codes) == {"200"}, f"{url}: {codes}"
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not shutil.which("hey"):
        sys.exit("hey not found: apt-get install hey")
    folder = Path(tempfile.mkdtemp(prefix="mll-bench-batching-"))
    body = folder / "body.json"
    body.write_text(json.dumps({"x": [0.1 * i for i in range(FEATURES)]}))
    results: dict[str, list[dict[str, float]]] = {p: [] for p in PIPELINES}
    with running_stack(folder, stack()) as (ports, _):
        for _ in range(args.runs):
            for name in PIPELINES:
                results[name].append(hey(f"http://127.0.0.1:{ports['gateway']}/pipelines/{name}", body))
    print(f"{'pipeline':<10}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}   (median of {args.runs} runs)")
    for name in PIPELINES:
        rps, p50, p99 = (median([r[k] for r in results[name]]) for k in ("rps", "p50", "p99"))
        print(f"{name:<10}{rps:>10.0f}{p50:>10.1f}{p99:>10.1f}")
    ratio = [b["rps"] / s["rps"] for s, b in zip(results["single"], results["batched"], strict=True)]
    tail = [b["p99"] / s["p99"] for s, b in zip(results["single"], results["batched"], strict=True)]
    print(f"\nbatched / single: {median(ratio):.2f}x throughput, {median(tail):.2f}x p99 (medians of per-run ratios)")


if __name__ == "__main__":
    main()
