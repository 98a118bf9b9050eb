"""Saved-model runtimes against their own libraries: what serving a model file through ML Lambda costs per request.

The five models of examples/formats/train.py (scikit-learn, ONNX, XGBoost, LightGBM, MLflow), trained in
their own environment and built from the saved files (`package:` in a stack file, no code of ours). Each
runs twice on one local stack: `<fmt>` one library call per request, `<fmt>-b` with adaptive batching
(`--max-batch=32`). Per run, for each format in turn:
  direct        the library called in one process, one row at a time (examples/formats/direct.py)
  c=1           wrk, 1 connection: the whole request (gateway Envoy, sidecar, runtime, library) one at a time
  c=16          wrk, 16 connections, without and with batching; the mean batch from the runtime's histogram
Medians of the runs. Run: .venv/bin/python -m bench.formats [--runs 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.common import median, running_stack
from bench.pipeline_hops import wrk, wrk_folder
from controlplane.models.envs import env_python
from controlplane.node import processes
from examples.formats.saved import HERE, train, training_env

FORMATS = ("sklearn", "onnx", "xgboost", "lightgbm", "mlflow")
JSON_HEADER = "wrk.headers['Content-Type'] = 'application/json'"


def stack(saved: Path) -> dict[str, Any]:
    runtimes, pipelines = [], []
    for fmt in FORMATS:
        for name, args in ((fmt, []), (f"{fmt}-b", ["--max-batch=32"])):
            runtimes.append({"model": name, "version": "v1", "package": str(saved / fmt), "args": args})
            pipelines.append({"name": name, "stages": [{"name": "m", "variants": [{"model": name, "version": "v1"}]}]})
    return {"name": "bench-formats", "security": "plaintext", "runtimes": runtimes, "pipelines": pipelines}


def one_row(saved: Path, fmt: str) -> dict[str, Any]:
    rows = json.loads((saved / f"{fmt}.expected.json").read_text())["rows"]
    if isinstance(rows, dict):
        return {name: values[0] for name, values in rows.items()}
    return {"predict_proba" if fmt == "onnx" else "input": rows[0]}


def batches(consul_port: int, model: str) -> tuple[float, float]:
    """(sum, count) of the model's runtime's batch-size histogram."""
    _, body = processes.http_get(f"http://127.0.0.1:{consul_port}/v1/catalog/service/{model}")
    total = count = 0.0
    for entry in json.loads(body):
        _, metrics = processes.http_get(f"http://127.0.0.1:{entry['ServiceMeta']['runtime_port']}/metrics")
        for line in metrics.splitlines():
            if line.startswith("mllambda_runtime_batch_size_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith("mllambda_runtime_batch_size_count"):
                count += float(line.rsplit(" ", 1)[1])
    return total, count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    folder, _ = wrk_folder("mll-bench-formats-")
    saved = train(Path(tempfile.mkdtemp(prefix="mll-formats-saved-")))
    results: dict[str, dict[str, list[float]]] = {f: {} for f in FORMATS}

    def keep(fmt: str, key: str, value: float) -> None:
        results[fmt].setdefault(key, []).append(value)

    with running_stack(folder, stack(saved)) as (ports, _):
        for _ in range(args.runs):
            done = subprocess.run(
                [str(env_python(training_env())), str(HERE / "direct.py"), str(saved), str(args.seconds)],
                capture_output=True,
                text=True,
                check=True,
            )
            direct = json.loads(done.stdout.strip().splitlines()[-1])
            for fmt in FORMATS:
                script = folder / f"{fmt}.lua"
                body = json.dumps(one_row(saved, fmt)).replace("\\", "\\\\").replace("'", "\\'")
                script.write_text(
                    f'wrk.method = "POST"\nwrk.body = \'{body}\'\nwrk.headers["Content-Type"] = "application/json"\n'
                )
                url = f"http://127.0.0.1:{ports['gateway']}/pipelines/{fmt}"
                wrk(url, 4, 1, script)  # warm-up
                keep(fmt, "direct_rps", direct[fmt]["rps"])
                keep(fmt, "direct_p50", direct[fmt]["p50"])
                one = wrk(url, 1, args.seconds, script)
                keep(fmt, "c1_rps", one["rps"])
                keep(fmt, "c1_p50", one["p50"])
                keep(fmt, "c1_p99", one["p99"])
                many = wrk(url, 16, args.seconds, script)
                keep(fmt, "c16_rps", many["rps"])
                keep(fmt, "c16_p99", many["p99"])
                before = batches(ports["consul"], f"{fmt}-b")
                batched = wrk(f"{url}-b", 16, args.seconds, script)
                after = batches(ports["consul"], f"{fmt}-b")
                keep(fmt, "b16_rps", batched["rps"])
                keep(fmt, "b16_p99", batched["p99"])
                keep(fmt, "batch", (after[0] - before[0]) / max(1.0, after[1] - before[1]))
                for result in (one, many, batched):
                    assert result["errors"] == 0, (fmt, result)
    m = {fmt: {key: median(values) for key, values in found.items()} for fmt, found in results.items()}
    print(f"\nper format, median of {args.runs} runs of {args.seconds} s each")
    print(
        f"{'format':<10}{'direct/s':>10}{'direct p50':>11}{'c=1 /s':>9}{'c=1 p50':>9}{'c=1 p99':>9}{'overhead':>10}"
        f"{'c=16 /s':>9}{'c=16 p99':>10}{'batched/s':>10}{'b p99':>8}{'batch':>7}"
    )
    for fmt in FORMATS:
        r = m[fmt]
        overhead = r["c1_p50"] - r["direct_p50"]
        print(
            f"{fmt:<10}{r['direct_rps']:>10.0f}{r['direct_p50']:>9.2f}ms{r['c1_rps']:>9.0f}{r['c1_p50']:>7.2f}ms"
            f"{r['c1_p99']:>7.2f}ms{overhead:>8.2f}ms{r['c16_rps']:>9.0f}{r['c16_p99']:>8.1f}ms"
            f"{r['b16_rps']:>10.0f}{r['b16_p99']:>6.1f}ms{r['batch']:>7.1f}"
        )


if __name__ == "__main__":
    main()
