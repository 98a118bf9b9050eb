"""What mTLS on every hop costs: the 3-stage pipeline with `security: mtls` vs `security: plaintext`,
both stacks up at once and measured in turns (same machine, same minute), next to a plain aiohttp chain.

1. Latency the way Istio publishes it: open loop at 1,000 requests/s, 16 connections, 1 KB body
   (hey, -q per worker), p50/p90/p99; the mesh's added latency per stage = (mesh - plain) / 3.
2. Throughput: wrk, 32 connections, 8 s.
Run: .venv/bin/python -m bench.mtls [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import median, running_stack
from bench.pipeline_hops import MODELS, POST_LUA, plain_chain, stage, wrk

BODY = json.dumps({"text": " ".join(["word"] * 200)})  # ~1 KB, as in Istio's figures
PATHS = ("plain aiohttp chain", "ML Lambda plaintext", "ML Lambda mTLS")


def hey(url: str, body: Path) -> dict[str, float]:
    """Open loop: 16 workers at 62.5 requests/s each = 1,000/s for 10 s."""
    out = subprocess.run(
        ["hey", "-z", "10s", "-c", "16", "-q", "62.5", "-m", "POST", "-T", "application/json", "-D", str(body), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "90", "99"):
        found[f"p{pct}"] = float(re.search(rf"{pct}%+ in ([\d.]+) secs", out).group(1)) * 1000  # type: ignore[union-attr]
    codes = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", out))
    found["errors"] = float(sum(int(n) for code, n in codes.items() if code != "200"))
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for tool in ("wrk", "hey"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: apt-get install {tool}")
    folder = Path(tempfile.mkdtemp(prefix="mll-bench-mtls-"))
    body, script = folder / "body.json", folder / "post.lua"
    body.write_text(BODY)
    script.write_text(POST_LUA)
    models = ("tokenize", "count", "score")

    def stack(security: str) -> dict[str, object]:
        return {
            "name": f"bench-{security}",
            "security": security,
            "gateway_concurrency": 1,
            "runtimes": [{"model": m, "version": "v1", "target": f"{MODELS}:{m}"} for m in models],
            "pipelines": [{"name": "bench", "transport": "http", "stages": [stage(m) for m in models]}],
        }

    started = time.time()
    with contextlib.ExitStack() as stacks:
        urls = {PATHS[0]: stacks.enter_context(plain_chain(folder))}
        for path, security in ((PATHS[1], "plaintext"), (PATHS[2], "mtls")):
            (folder / security).mkdir()
            stack_ports, _ = stacks.enter_context(running_stack(folder / security, stack(security)))
            urls[path] = f"http://127.0.0.1:{stack_ports['gateway']}/pipelines/bench"
        latency: dict[str, list[dict[str, float]]] = {p: [] for p in PATHS}
        load: dict[str, list[dict[str, float]]] = {p: [] for p in PATHS}
        for _ in range(args.runs):
            for path, url in urls.items():
                latency[path].append(hey(url, body))
                load[path].append(wrk(url, 32, 8, script))
    report(latency, load, args.runs)
    print(f"\n({time.time() - started:.0f} s; logs in {folder})")


def report(latency: dict[str, list[dict[str, float]]], load: dict[str, list[dict[str, float]]], runs: int) -> None:
    print(f"\n1. open loop, 1,000 req/s, 16 connections, 1 KB, median of {runs} runs of 10 s (ms)")
    print(f"   {'path':<22}{'p50':>8}{'p90':>8}{'p99':>8}{'non-2xx':>9}")
    mid = {p: {k: median([r[k] for r in rows]) for k in ("p50", "p90", "p99")} for p, rows in latency.items()}
    for path, rows in latency.items():
        errors = sum(r["errors"] for r in rows)
        print(f"   {path:<22}{mid[path]['p50']:>8.3f}{mid[path]['p90']:>8.3f}{mid[path]['p99']:>8.3f}{errors:>9.0f}")
    for path in PATHS[1:]:
        per_stage = {k: (mid[path][k] - mid[PATHS[0]][k]) / 3 for k in ("p50", "p90", "p99")}
        print(
            f"   added per stage, {path}: p90 {per_stage['p90']:.3f}, p99 {per_stage['p99']:.3f} (Istio: 0.228 / 0.298)"
        )
    mtls_cost = {k: (mid[PATHS[2]][k] - mid[PATHS[1]][k]) / 3 for k in ("p50", "p90", "p99")}
    print(
        f"   mTLS alone per stage: p50 {mtls_cost['p50']:.3f}, p90 {mtls_cost['p90']:.3f}, p99 {mtls_cost['p99']:.3f}"
    )
    print(f"\n2. throughput, wrk 32 connections, median of {runs} runs of 8 s")
    rps = {p: median([r["rps"] for r in rows]) for p, rows in load.items()}
    for path, rows in load.items():
        p99 = median([r["p99"] for r in rows])
        print(f"   {path:<22}{rps[path]:>9.0f} req/s  p99 {p99:.2f} ms  non-2xx {sum(r['errors'] for r in rows):.0f}")
    print(f"   ratio mTLS / plaintext: {rps[PATHS[2]] / rps[PATHS[1]]:.2f}")


if __name__ == "__main__":
    main()
