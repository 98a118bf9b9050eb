"""Shared helpers for the benchmarks: percentiles, medians of runs, a real Envoy, a whole stack."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from controlplane.config import PROJECT_ROOT, tools_dir
from controlplane.node import processes
from controlplane.node.sidecar import render_bootstrap
from controlplane.node.tools import find_envoy


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def start_sidecar_envoy(node_id: str, xds_addr: str, delta: bool) -> processes.ManagedProcess:
    envoy = find_envoy()
    assert envoy is not None, "run ./dev bootstrap first"
    folder = Path(tempfile.mkdtemp(prefix="mll-bench-"))
    admin = processes.free_port()
    config = folder / "envoy.yaml"
    config.write_text(render_bootstrap(node_id, "bench", xds_addr, admin, delta=delta))
    return processes.ManagedProcess("envoy", processes.envoy_argv(envoy, config), folder / "envoy.log").start()


def process_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of this machine's stack processes, by pid, with a role label."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        role = process_role(argv)
        if role:
            found[int(entry.name)] = (role, (int(fields[11]) + int(fields[12])) / tick)
    return found


def memory_mib(roles: set[str], field: str = "VmRSS") -> float:
    """The memory of every process of these roles, summed (`VmHWM`: each one's peak)."""
    total = 0
    for pid, (role, _) in process_cpu().items():
        if role in roles:
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith(f"{field}:"))
    return total / 1024


def runtime_codes(consul_port: int, model: str, service_id: str = "") -> Counter[str]:
    """A model's answered requests by status code, from its runtimes' own /metrics (their ports found in
    Consul); `service_id`: that instance's only."""
    _, body = processes.http_get(f"http://127.0.0.1:{consul_port}/v1/catalog/service/{model}")
    found: Counter[str] = Counter()
    for entry in json.loads(body):
        if service_id and entry["ServiceID"] != service_id:
            continue
        _, metrics = processes.http_get(f"http://127.0.0.1:{entry['ServiceMeta']['runtime_port']}/metrics")
        for line in metrics.splitlines():
            if line.startswith("mllambda_runtime_requests_total{"):
                found[line.split('code="', 1)[1].split('"', 1)[0]] += int(float(line.rsplit(" ", 1)[1]))
    return found


def process_role(argv: list[str]) -> str:
    text = " ".join(argv)
    if argv[0].startswith("ray::") or "/.tools/ray/" in text:
        return "ray"
    if "/.tools/bento/" in text:
        return "bentoml"
    if Path(argv[0]).name == "consul":
        return "consul"
    if Path(argv[0]).name == "envoy":
        return "envoy (sidecar)" if "-envoy.yaml" in text else "envoy (gateway/other)"
    if "bench.plain_chain" in text:
        return "python (plain stage)"
    if " runtime " in f" {text} ":
        return "python (runtime SDK)"
    if "controlplane" in text and "python" in Path(argv[0]).name:
        return "python (control plane/supervisor)"
    return ""


def cpu_spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between two process_cpu() samples, summed by role."""
    spent: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        spent[role] = spent.get(role, 0.0) + seconds - before.get(pid, (role, 0.0))[1]
    return spent


def children_cpu() -> float:
    """CPU seconds of this process's finished children (e.g. a wrk run)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


CLI = [sys.executable, "-m", "controlplane.cli"]


@contextmanager
def running_stack(
    folder: Path, stack: dict[str, Any], more_env: dict[str, str] | None = None, root: Path = PROJECT_ROOT
) -> Iterator[tuple[dict[str, int], dict[str, str]]]:
    """`mllambda up --detach` a stack on free ports (`more_env`: for its processes too), `down` at the end.

    `root`: the checkout whose code runs the stack (`checkout`: another revision, side by side with this one).
    Yields its ports and the environment that points the CLI at it.
    """
    names = ["consul", "xds", "admin", "gateway", "gateway_admin", "controlplane_metrics"]
    ports = {name: processes.free_port() for name in [*names, *(["kafka", "bridge"] if stack.get("kafka") else [])]}
    (folder / "stack.yaml").write_text(yaml.safe_dump({"kind": "Stack", **stack, "ports": ports}))
    env = {
        **os.environ,
        "MLLAMBDA_STATE_DIR": str(folder / "state"),
        "MLLAMBDA_ADMIN_ADDR": f"127.0.0.1:{ports['admin']}",
        "MLLAMBDA_TOOLS_DIR": str(tools_dir()),
        **(more_env or {}),
    }
    up = [*CLI, "up", "-f", str(folder / "stack.yaml"), "--detach"]
    subprocess.run(up, env=env, check=True, cwd=root, stdout=subprocess.DEVNULL)
    try:
        yield ports, env
    finally:
        subprocess.run([*CLI, "down"], env=env, cwd=root, stdout=subprocess.DEVNULL)


def nlp_stack() -> dict[str, Any]:
    """The NLP example's stack file as data, its package folders absolute (the copy a bench writes lives elsewhere)."""
    folder = PROJECT_ROOT / "examples" / "nlp"
    stack: dict[str, Any] = yaml.safe_load((folder / "stack.yaml").read_text())
    for runtime in stack["runtimes"]:
        if "package" in runtime:
            runtime["package"] = str((folder / runtime["package"]).resolve())
    return stack


def checkout(revision: str) -> Path:
    """A worktree of `revision` (its admin stubs generated) for `running_stack(root=...)`: `python -m` from
    its folder imports its code, so one run can set a change against what came before it."""
    found = subprocess.run(["git", "rev-parse", revision], cwd=PROJECT_ROOT, check=True, capture_output=True, text=True)
    sha = found.stdout.strip()
    where = Path(tempfile.gettempdir()) / f"mll-checkout-{sha[:12]}"
    if not where.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(where), sha], cwd=PROJECT_ROOT, check=True)
    env = {**os.environ, "MLLAMBDA_TOOLS_DIR": str(tools_dir())}
    subprocess.run([*CLI, "setup"], cwd=where, env=env, check=True, stdout=subprocess.DEVNULL)
    return where
