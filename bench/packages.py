"""Model packages: what `build` and `deploy -> passing` cost with and without caches, and disk per environment.

Dependency set: scikit-learn (and what it pulls in: numpy, scipy, joblib, threadpoolctl, narwhals) for
one package; the same plus gensim for a second, so the two environments share most of their wheels.

Each run, for each package:
  build, cold        an empty uv cache and no environment: the index is asked, every wheel downloaded
  build, warm uv     uv's cache holds the wheels, the environment is new (another host, a new lock)
  build, same lock   the environment exists (the same lock built before): lock, pack, import check
  deploy -> passing  `mllambda runtime --package` until Consul says passing: with its environment on
                     this host, and with it removed (uv's cache warm)
Then the disk the two environments take, alone and together (uv hard-links from its cache: what they
share is counted once), and the uv cache itself.

Run: .venv/bin/python -m bench.packages [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from bench.common import median
from controlplane.config import PROJECT_ROOT
from controlplane.node import processes
from controlplane.node.tools import find_consul

CLI = [sys.executable, "-m", "controlplane.cli"]
MODEL = """
import sklearn


def predict(payload: dict) -> dict:
    return {"sklearn": sklearn.__version__}
"""
PACKAGES = {"sklearn": "scikit-learn>=1.4,<2\n", "sklearn+gensim": "scikit-learn>=1.4,<2\ngensim>=4.3,<5\n"}


def package(folder: Path, requirements: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.py").write_text(MODEL)
    (folder / "requirements.txt").write_text(requirements)
    (folder / "mllambda.yaml").write_text("kind: Model\nentry: model:predict\n")
    return folder


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=PROJECT_ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr}")
    return time.perf_counter() - started


def passing(consul_port: int, model: str, service_id: str) -> Callable[[], bool]:
    url = f"http://127.0.0.1:{consul_port}/v1/health/service/{model}?passing=true"
    return lambda: service_id in processes.http_get(url)[1]


def du(*paths: Path) -> int:
    """Bytes on disk, each hard-linked file once (du's own rule over all paths given together)."""
    done = subprocess.run(["du", "-sbc", *map(str, paths)], capture_output=True, text=True, check=True)
    return int(done.stdout.splitlines()[-1].split()[0])


def one_run(work: Path, results: dict[str, list[float]], disk: dict[str, list[float]]) -> None:
    uv_cache, cache, store = work / "uv-cache", work / "cache", work / "store"
    consul_port, admin_port, xds_port = processes.free_port(), processes.free_port(), processes.free_port()
    consul = processes.ManagedProcess(
        "consul",
        processes.consul_dev_argv(
            Path(str(find_consul())),
            work / "consul",
            {
                "http": consul_port,
                **{k: processes.free_port() for k in ("dns", "serf_lan", "serf_wan", "server", "grpc")},
            },
        ),
        work / "consul.log",
    ).start()
    env = {
        **os.environ,
        "UV_CACHE_DIR": str(uv_cache),
        "MLLAMBDA_CACHE_DIR": str(cache),
        "MLLAMBDA_MODEL_STORE": str(store),
        "MLLAMBDA_ADMIN_ADDR": f"127.0.0.1:{admin_port}",
        "MLLAMBDA_RUN_DIR": str(work / "run"),
    }
    plane = None
    try:
        consul.wait_ready(processes.consul_ready(consul_port), timeout=30)
        plane = processes.ManagedProcess(
            "controlplane",
            [
                *CLI,
                "controlplane",
                f"--admin=127.0.0.1:{admin_port}",
                f"--consul=127.0.0.1:{consul_port}",
                f"--xds=127.0.0.1:{xds_port}",
                f"--gateway-port={processes.free_port()}",
            ],
            work / "controlplane.log",
            env=env,
        ).start()
        plane.wait_ready(processes.tcp_ready(admin_port), timeout=30)
        for name, requirements in PACKAGES.items():
            folder = package(work / name, requirements)
            build = [*CLI, "build", str(folder), f"--model={name.replace('+', '-')}", "--version=v1"]
            if name == "sklearn":  # the first package meets an empty uv cache
                results[f"build, cold ({name})"].append(timed(build, env))
            else:
                results[f"build, warm uv cache, new lock ({name})"].append(timed(build, env))
            shutil.rmtree(cache / "envs")
            results[f"build, warm uv cache ({name})"].append(timed([*build[:-1], "--version=v2"], env))
            (folder / "notes.txt").write_text("another file, the same lock")
            results[f"build, same lock ({name})"].append(timed([*build[:-1], "--version=v3"], env))
            for state in ("environment on this host", "environment removed, uv cache warm"):
                if state.startswith("environment removed"):
                    shutil.rmtree(cache / "envs")
                    shutil.rmtree(cache / "packages")
                model = name.replace("+", "-")
                service_id = f"{model}-{len(results)}-{time.monotonic_ns()}"
                runtime = processes.ManagedProcess(
                    service_id,
                    [
                        *CLI,
                        "runtime",
                        "--package",
                        f"--model={model}",
                        "--version=v1",
                        f"--service-id={service_id}",
                        f"--consul=127.0.0.1:{consul_port}",
                        f"--xds=127.0.0.1:{xds_port}",
                    ],
                    work / f"{service_id}.log",
                    env=env,
                )
                started = time.perf_counter()
                runtime.start()
                runtime.wait_ready(passing(consul_port, model, service_id), timeout=300)
                results[f"deploy -> passing, {state} ({name})"].append(time.perf_counter() - started)
                runtime.stop()
        for name in PACKAGES:  # both environments in place again (the same lock: built if missing)
            timed([*CLI, "build", str(work / name), f"--model={name.replace('+', '-')}", "--version=v3"], env)
        envs = [e for e in (cache / "envs").iterdir() if e.is_dir()]
        with_gensim = [e for e in envs if list(e.glob("lib/python*/site-packages/gensim"))]
        alone = [e for e in envs if e not in with_gensim]
        disk["environment: scikit-learn, alone (MB)"].append(du(*alone) / 1e6)
        disk["environment: scikit-learn + gensim, alone (MB)"].append(du(*with_gensim) / 1e6)
        disk["both environments together (MB)"].append(du(*envs) / 1e6)
        disk["uv cache (MB)"].append(du(uv_cache) / 1e6)
    finally:
        if plane is not None:
            plane.stop()
        consul.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[float]] = defaultdict(list)
    disk: dict[str, list[float]] = defaultdict(list)
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="mll-bench-packages-", dir=PROJECT_ROOT / ".cache") as scratch:
            print(f"run {run + 1}/{args.runs}", file=sys.stderr, flush=True)
            one_run(Path(scratch), results, disk)
    print(f"| what | median of {args.runs} (s) | runs |\n|---|---|---|")
    for what, values in results.items():
        print(f"| {what} | {median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    print("\n| disk | median (MB) |\n|---|---|")
    for what, values in disk.items():
        print(f"| {what} | {median(values):.0f} |")


if __name__ == "__main__":
    main()
