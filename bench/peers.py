"""The peer benchmark: one 3-stage pipeline (tokenize -> count -> score) on every system, same load.

Systems: a plain aiohttp chain (no mesh: the limit), ML Lambda (http, uds, http with mTLS), Ray Serve
(DeploymentHandle composition, one replica per stage; default and RAY_SERVE_THROUGHPUT_OPTIMIZED) and
BentoML (`bentoml.depends` composition, one worker per service; default and its access log off). Ray and
BentoML are installed into .tools/ray and .tools/bento on first use (not project dependencies). Each run
starts one system alone, checks a sample of its answers against the predicts' own, warms it up, then loads
it with wrk (32 connections, 8 s) while reading every process's CPU time from /proc by role, and its
memory.
Systems take turns within each run; medians of the runs are reported.

`--against REV` adds ML Lambda (http) as of git revision REV, run from a worktree in the same turns: a
change measured against what came before it on the same noisy machine.

Run: .venv/bin/python -m bench.peers [--runs 3] [--only NAME ...] [--against REV]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import checkout, children_cpu, cpu_spent, median, memory_mib, process_cpu, running_stack
from bench.pipeline_hops import MODELS, plain_chain, stage, wrk, wrk_folder
from controlplane.config import PROJECT_ROOT
from controlplane.node import processes

PEER_WANT = {"ray": "ray[serve]>=2.40,<3", "bento": "bentoml>=1.4,<2"}  # each into .tools/<key>
SAMPLES = ["the quick brown fox jumps", "one", " ".join(["word"] * 50)]
PLAIN, MTLS = {"security": "plaintext"}, {"security": "mtls"}
EACH_SIDECAR = {"colocated": "direct", "gateway_concurrency": 1}  # the gateway's one traversal: one worker is best
SYSTEMS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain aiohttp chain": ("plain", {}),
    "plain aiohttp chain, the SDK's client": ("plain", {"client": "hop"}),
    "ML Lambda, http": ("mllambda", {"transport": "http", **PLAIN}),
    "ML Lambda, http, output through each sidecar": ("mllambda", {"transport": "http", **PLAIN, **EACH_SIDECAR}),
    "ML Lambda, http, every hop through the ingress": (
        "mllambda",
        {"transport": "http", **PLAIN, "colocated": "ingress", "gateway_concurrency": 1},
    ),
    "ML Lambda, http, model profiling off": ("mllambda", {"transport": "http", **PLAIN, "profile_percent": 0}),
    "ML Lambda, http, model profiling at 5%": ("mllambda", {"transport": "http", **PLAIN, "profile_percent": 5}),
    "ML Lambda, http, flow control on": ("mllambda", {"transport": "http", **PLAIN, "flow": True}),
    "ML Lambda, http, rate limit on": ("mllambda", {"transport": "http", **PLAIN, "rate_limit": True}),
    "ML Lambda, uds": ("mllambda", {"transport": "uds", **PLAIN}),
    "ML Lambda, http + mTLS": ("mllambda", {"transport": "http", **MTLS}),
    "ML Lambda, http + mTLS, output through each sidecar": ("mllambda", {"transport": "http", **MTLS, **EACH_SIDECAR}),
    "ML Lambda, http + mTLS, every hop through the ingress": (
        "mllambda",
        {"transport": "http", **MTLS, "colocated": "ingress", "gateway_concurrency": 1},
    ),
    "Ray Serve": ("ray", {"optimized": False}),
    "Ray Serve, throughput-optimized": ("ray", {"optimized": True}),
    "BentoML": ("bento", {"access_log": True}),
    "BentoML, access log off": ("bento", {"access_log": False}),
}
PEERS = ("Ray Serve", "Ray Serve, throughput-optimized", "BentoML", "BentoML, access log off")


def expected(text: str) -> dict[str, int]:
    """What tokenize -> count -> score answer (examples/trivial/models.py)."""
    return {"count": len(text.split()), "score": 10 * len(text.split())}


@contextlib.contextmanager
def mllambda(
    folder: Path,
    transport: str,
    security: str,
    colocated: str = "shared",
    gateway_concurrency: int | None = None,
    root: Path = PROJECT_ROOT,
    profile_percent: float | None = None,
    flow: bool = False,
    rate_limit: bool = False,
) -> Iterator[str]:
    """The stack as `mllambda up` runs it (the gateway Envoy carries the runtimes' output too, one worker per
    core), or with `colocated` / `gateway_concurrency` set otherwise; `root`: another revision's checkout;
    `profile_percent`: the runtimes' model profiling (default: theirs, 5%); `flow`: admission at every runtime
    (places for twice wrk's connections, a queue as many) and a critical pipeline with fair shares by a header;
    `rate_limit`: a quota per caller at the gateway far above the load (every request checked, none refused)."""
    models = ("tokenize", "count", "score")
    flags = [f"--profile-percent={profile_percent:g}"] if profile_percent is not None else []
    flags += ["--max-in-flight=64", "--queue=64"] if flow else []
    args = {"args": flags} if flags else {}
    admission = {"priority": "critical", "fairness": {"header": "x-tenant"}} if flow else {}
    admission |= {"rate_limit": {"per_second": 1_000_000}} if rate_limit else {}
    stack = {
        "name": "peers",
        "security": security,
        **({"gateway_concurrency": gateway_concurrency} if gateway_concurrency else {}),
        "runtimes": [{"model": m, "version": "v1", "target": f"{MODELS}:{m}", **args} for m in models],
        "pipelines": [{"name": "bench", "transport": transport, "stages": [stage(m) for m in models], **admission}],
    }
    with running_stack(folder, stack, {"MLLAMBDA_COLOCATED": colocated}, root) as (ports, _):
        yield f"http://127.0.0.1:{ports['gateway']}/pipelines/bench"


def ensure_peer(name: str) -> Path:
    """The bin folder of a peer's own virtual environment, .tools/<name>, installed on first use."""
    venv, want = PROJECT_ROOT / ".tools" / name, PEER_WANT[name]
    stamp = venv / ".installed"
    if stamp.exists() and stamp.read_text() == want:
        return venv / "bin"
    print(f"==> installing {want} into {venv} (once; a few minutes)", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", want], check=True)
    stamp.write_text(want)
    return venv / "bin"


@contextlib.contextmanager
def ray(folder: Path, optimized: bool, app: str = "") -> Iterator[str]:
    """bench/ray_app.py on Ray Serve (`app`: "echo" for three stages passing their input on)."""
    python, port = ensure_peer("ray") / "python", processes.free_port()
    env = {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if optimized else "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",  # a loopback-only benchmark cluster
    }
    argv = [str(python), str(PROJECT_ROOT / "bench" / "ray_app.py"), str(port), *([app] if app else [])]
    driver = processes.ManagedProcess("ray", argv, folder / f"ray-{port}.log", env=env).start()
    try:
        driver.wait_ready(lambda: "ready" in (folder / f"ray-{port}.log").read_text(), timeout=180)
        yield f"http://127.0.0.1:{port}/"
    finally:
        driver.stop()
        subprocess.run([str(python.parent / "ray"), "stop", "--force"], capture_output=True)


@contextlib.contextmanager
def bento(folder: Path, access_log: bool, service: str = "Pipeline") -> Iterator[str]:
    """`bentoml serve` of bench/bento_app.py: the entry service and the three it depends on, a process each."""
    bentoml, port = ensure_peer("bento") / "bentoml", processes.free_port()
    argv = [str(bentoml), "serve", f"bench.bento_app:{service}", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--working-dir", str(PROJECT_ROOT)]
    env = {"BENTO_ACCESS_LOG": "1" if access_log else "0", "BENTOML_DO_NOT_TRACK": "True"}
    log = folder / f"bento-{port}.log"
    server = processes.ManagedProcess("bento", argv, log, env=env).start()
    try:
        server.wait_ready(lambda: log.read_text().count("initialized") >= 4, timeout=120)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.stop()


def answers_right(url: str) -> None:
    for text in SAMPLES:
        request = urllib.request.Request(url, data=json.dumps({"text": text}).encode(), method="POST")
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=30) as resp:
            got = json.loads(resp.read())
        if got != expected(text):
            raise SystemExit(f"{url} answered {got!r} for {text!r}, not {expected(text)!r}")


def measure(url: str, script: Path) -> dict[str, float]:
    answers_right(url)
    wrk(url, 32, 2, script)  # warm-up: connection pools, Ray's replicas
    before, wrk_before = process_cpu(), children_cpu()
    result = wrk(url, 32, 8, script)
    spent = cpu_spent(before, process_cpu())
    spent["wrk"] = children_cpu() - wrk_before
    result["cpu_us"] = sum(spent.values()) / result["requests"] * 1e6
    result.update({f"cpu {role}": seconds / result["requests"] * 1e6 for role, seconds in spent.items()})
    result["mib"] = memory_mib({role for role, seconds in spent.items() if seconds > 0} | {"consul"})
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=list(SYSTEMS), help="these systems only")
    parser.add_argument("--against", metavar="REV", help="also ML Lambda, http as of git revision REV")
    args = parser.parse_args()
    folder, script = wrk_folder("mll-bench-peers-")
    starters: dict[str, Any] = {"plain": plain_chain, "mllambda": mllambda, "ray": ray, "bento": bento}
    chosen = {name: SYSTEMS[name] for name in args.only or SYSTEMS}
    if args.against:
        chosen[f"ML Lambda, http, at {args.against}"] = (
            "mllambda",
            {"transport": "http", **PLAIN, "root": checkout(args.against)},
        )
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
    started = time.time()
    for run in range(args.runs):
        turns = list(enumerate(chosen.items()))  # every other run in reverse: no system always follows the same one
        for index, (name, (kind, options)) in turns[:: -1 if run % 2 else 1]:
            where = folder / f"run{run}-system{index}"
            where.mkdir()
            with starters[kind](where, **options) as url:
                rows[name].append(measure(url, script))
            print(f"   run {run + 1}/{args.runs} {name}: {rows[name][-1]['rps']:.0f} req/s", flush=True)
    report(rows, args.runs)
    print(f"\n({time.time() - started:.0f} s; logs in {folder})")


def report(rows: dict[str, list[dict[str, float]]], runs: int) -> None:
    mid = {name: {k: median([r.get(k, 0.0) for r in v]) for k in v[0]} for name, v in rows.items()}
    print(f"\n3-stage pipeline, wrk 32 connections, 8 s, median of {runs} runs")
    print(
        "| system | req/s | p50 ms | p99 ms | CPU us per request | RSS MiB | non-2xx |\n|---|---|---|---|---|---|---|"
    )
    for name, m in mid.items():
        errors = sum(r["errors"] for r in rows[name])
        print(
            f"| {name} | {m['rps']:,.0f} | {m['p50']:.1f} | {m['p99']:.1f} | {m['cpu_us']:,.0f} | {m['mib']:,.0f} "
            f"| {errors:.0f} |"
        )
    print("\nCPU us per request by process role (medians)")
    for name, m in mid.items():
        parts = ", ".join(f"{k[4:]} {v:.0f}" for k, v in sorted(m.items()) if k.startswith("cpu ") and v >= 1)
        print(f"- {name}: {parts}")
    ours = mid.get("ML Lambda, http")
    for name in [n for n in rows if n.startswith("ML Lambda, http, at ")] + ["plain aiohttp chain"]:
        if "ML Lambda, http" in rows and name in rows:  # the ratio within each run, where the noise is shared
            ratios = [a["rps"] / b["rps"] for a, b in zip(rows["ML Lambda, http"], rows[name], strict=True)]
            print(
                f"ML Lambda http / {name}, per run: {', '.join(f'{x:.2f}' for x in ratios)} "
                f"(median {median(ratios):.2f}x)"
            )
    for name in ("plain aiohttp chain", *PEERS):
        if ours and name in mid:
            print(
                f"ML Lambda http / {name}: req/s {ours['rps'] / mid[name]['rps']:.2f}x, "
                f"p99 {ours['p99'] / mid[name]['p99']:.2f}x"
            )


if __name__ == "__main__":
    main()
