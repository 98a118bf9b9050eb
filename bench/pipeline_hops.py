"""Data path cost, measured with wrk (apt-get install wrk), baseline and subject interleaved.

1. Added latency of two Envoy hops (sidecar -> sidecar, configs from our own
   resource builders): wrk -c1 against a backend directly vs through the Envoys.
2. Throughput of the 3-stage example pipeline through the real stack (gateway,
   three sidecars, runtime SDK) vs a plain aiohttp chain doing the same predicts.
Run: .venv/bin/python -m bench.pipeline_hops [--runs 5]
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
from collections.abc import Iterator
from pathlib import Path

from google.protobuf import json_format

from bench.common import children_cpu, cpu_spent, median, process_cpu, running_stack
from controlplane.node import processes
from controlplane.node.tools import find_envoy
from controlplane.translate import resources as r

POST_LUA = (
    'wrk.method = "POST"\n'
    'wrk.body = \'{"text": "the quick brown fox jumps"}\'\n'
    'wrk.headers["Content-Type"] = "application/json"\n'
)
MODELS = "examples.trivial.models"


def wrk(url: str, connections: int, seconds: int, script: Path) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    result["requests"] = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    for pct in ("50", "75", "90", "99"):
        match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)", out, re.M)
        assert match, out
        value, unit = float(match.group(1)), match.group(2)
        result[f"p{pct}"] = value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(errors.group(1)) if errors else 0.0
    return result


def static_envoy(folder: Path, name: str, listen: int, upstream: int) -> processes.ManagedProcess:
    """An Envoy with one HTTP listener and one static cluster, built like the generated config."""
    listener = json_format.MessageToDict(
        r.http_listener(name, r.tcp_address("127.0.0.1", listen), name), preserving_proto_field_name=True
    )
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    del hcm["rds"]
    route = r.route_config(name, [r.weighted_route("/", [("next", 1)])])
    hcm["route_config"] = json_format.MessageToDict(route, preserving_proto_field_name=True)
    cluster = json_format.MessageToDict(
        r.static_cluster("next", r.tcp_address("127.0.0.1", upstream)), preserving_proto_field_name=True
    )
    admin = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": processes.free_port()}}}
    config = folder / f"{name}.json"
    config.write_text(
        json.dumps({"admin": admin, "static_resources": {"listeners": [listener], "clusters": [cluster]}})
    )
    envoy = find_envoy()
    assert envoy
    proc = processes.ManagedProcess(name, processes.envoy_argv(envoy, config, 1), folder / f"{name}.log").start()
    proc.wait_ready(processes.tcp_ready(listen))
    return proc


def start_python(folder: Path, name: str, args: list[str], port: int) -> processes.ManagedProcess:
    proc = processes.ManagedProcess(name, [sys.executable, *args], folder / f"{name}.log").start()
    proc.wait_ready(processes.tcp_ready(port))
    return proc


def hop_latency(folder: Path, runs: int, script: Path) -> None:
    backend = processes.free_port()
    procs = [
        start_python(
            folder, "backend", ["-m", "bench.plain_chain", f"--port={backend}", f"--predict={MODELS}:tokenize"], backend
        )
    ]
    ingress, egress = processes.free_port(), processes.free_port()
    procs.append(static_envoy(folder, "ingress", ingress, backend))
    procs.append(static_envoy(folder, "egress", egress, ingress))
    try:
        rows: dict[str, list[dict[str, float]]] = {"direct": [], "two envoys": []}
        for _ in range(runs):
            rows["direct"].append(wrk(f"http://127.0.0.1:{backend}/", 1, 5, script))
            rows["two envoys"].append(wrk(f"http://127.0.0.1:{egress}/", 1, 5, script))
        print(f"\n1. latency, one connection, median of {runs} runs of 5 s (ms)")
        print(f"   {'path':<12}{'p50':>8}{'p90':>8}{'p99':>8}")
        summary = {k: {p: median([row[p] for row in v]) for p in ("p50", "p90", "p99")} for k, v in rows.items()}
        for path, values in summary.items():
            print(f"   {path:<12}{values['p50']:>8.3f}{values['p90']:>8.3f}{values['p99']:>8.3f}")
        added = {p: summary["two envoys"][p] - summary["direct"][p] for p in ("p50", "p90", "p99")}
        print(f"   {'added':<12}{added['p50']:>8.3f}{added['p90']:>8.3f}{added['p99']:>8.3f}")

        # What one traversal costs Envoy when it is busy (16 connections, one worker, as a sidecar runs).
        costs = []
        for _ in range(runs):
            before = process_cpu()
            result = wrk(f"http://127.0.0.1:{ingress}/", 16, 4, script)
            costs.append(cpu_spent(before, process_cpu()).get("envoy (gateway/other)", 0.0) / result["requests"])
        print(f"   CPU per Envoy traversal at 16 connections: {median(costs) * 1e6:.0f} us (median of {runs})")
    finally:
        for proc in procs:
            proc.stop()


@contextlib.contextmanager
def plain_chain(
    folder: Path, client: str = "aiohttp", models: tuple[str, ...] = ("tokenize", "count", "score")
) -> Iterator[str]:
    """The baseline: tokenize -> count -> score (or `models`) as three aiohttp servers calling each other (with
    aiohttp's client, or `client="hop"`: the runtime SDK's); yields its URL."""
    ports = [processes.free_port() for _ in range(3)]
    chain = []
    try:
        for i, model in enumerate(models):
            args = [
                "-m",
                "bench.plain_chain",
                f"--port={ports[i]}",
                f"--predict={MODELS}:{model}",
                f"--client={client}",
            ]
            args += [f"--next=http://127.0.0.1:{ports[i + 1]}/"] if i < 2 else []
            chain.append(start_python(folder, f"plain-{i}-{model}", args, ports[i]))
        yield f"http://127.0.0.1:{ports[0]}/"
    finally:
        for proc in chain:
            proc.stop()


def wrk_folder(prefix: str) -> tuple[Path, Path]:
    """A scratch folder and wrk's POST script in it; exits with the fix when wrk is missing."""
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install wrk")
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    (folder / "post.lua").write_text(POST_LUA)
    return folder, folder / "post.lua"


def stage(model: str) -> dict[str, object]:
    return {"name": model, "variants": [{"model": model, "version": "v1"}]}


def throughput(
    folder: Path, runs: int, script: Path, runtime_args: list[str], gateway_concurrency: int, transport: str
) -> None:
    models = ("tokenize", "count", "score")
    stack = {
        "name": "bench",
        "gateway_concurrency": gateway_concurrency,
        "runtimes": [{"model": m, "version": "v1", "target": f"{MODELS}:{m}", "args": runtime_args} for m in models],
        "pipelines": [{"name": "bench", "transport": transport, "stages": [stage(m) for m in models]}],
    }
    with plain_chain(folder) as plain_url, running_stack(folder, stack) as (stack_ports, _):
        rows: dict[str, list[dict[str, float]]] = {"plain aiohttp chain": [], "ML Lambda (Envoy)": []}
        urls = {
            "plain aiohttp chain": plain_url,
            "ML Lambda (Envoy)": f"http://127.0.0.1:{stack_ports['gateway']}/pipelines/bench",
        }
        cpu: dict[str, dict[str, float]] = {path: {} for path in urls}
        for _ in range(runs):
            for path, url in urls.items():
                before, wrk_before = process_cpu(), children_cpu()
                rows[path].append(wrk(url, 32, 8, script))
                spent = {**cpu_spent(before, process_cpu()), "wrk": children_cpu() - wrk_before}
                for role, seconds in spent.items():
                    cpu[path][role] = cpu[path].get(role, 0.0) + seconds
        print(f"\n2. 3-stage throughput, 32 connections, median of {runs} runs of 8 s")
        print(f"   {'path':<22}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}")
        medians = {}
        for path, values in rows.items():
            medians[path] = median([v["rps"] for v in values])
            p50, p99 = median([v["p50"] for v in values]), median([v["p99"] for v in values])
            errors = sum(v["errors"] for v in values)
            print(f"   {path:<22}{medians[path]:>9.0f}{p50:>9.2f}{p99:>9.2f}{errors:>9.0f}")
        ratio = medians["ML Lambda (Envoy)"] / medians["plain aiohttp chain"]
        print(f"   ratio ML Lambda / plain: {ratio:.2f}")
        print("\n   CPU per request by process role (us), all runs")
        for path, spent in cpu.items():
            requests = sum(v["requests"] for v in rows[path])
            parts = ", ".join(f"{role} {sec / requests * 1e6:.0f}" for role, sec in sorted(spent.items()) if sec)
            print(f"   {path}: total {sum(spent.values()) / requests * 1e6:.0f} = {parts}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", choices=["latency", "throughput"])
    parser.add_argument("--runtime-args", default="", help='extra runtime flags, e.g. "--inline=never"')
    parser.add_argument("--gateway-concurrency", type=int, default=1, help="gateway Envoy worker threads")
    parser.add_argument("--transport", default="http", choices=["http", "uds"])
    args = parser.parse_args()
    folder, script = wrk_folder("mll-bench-")
    started = time.time()
    if args.only != "throughput":
        hop_latency(folder, args.runs, script)
    if args.only != "latency":
        throughput(folder, args.runs, script, args.runtime_args.split(), args.gateway_concurrency, args.transport)
    print(f"\n({time.time() - started:.0f} s; logs in {folder})")


if __name__ == "__main__":
    main()
