"""A large fleet in Consul: admin Apply latency, registration -> gateway EDS, control-plane RSS and connections.

A real Consul agent, control plane and gateway Envoy. The fleet is registered
through the agent's HTTP API as runtimes register (meta, tag, a check; here a
TTL check set passing, since no process stands behind them): MODELS model
versions with several instances each. Two phases in the same run, so the
result is a ratio: a small fleet (the baseline) and the large one. In each:

- Apply: admin Apply calls (a new version each) while registrations churn in
  the background; latency per call.
- EDS: an instance of the pipeline's first model registers; time until the
  gateway Envoy lists it among the cluster's hosts (its admin /clusters, polled
  every 5 ms); then it deregisters.
- The control plane's RSS and its open TCP connections to Consul.

Run: .venv/bin/python -m bench.consul_scale [--services 2000] [--per-model 5] [--samples 60]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import median, percentile
from controlplane.admin.client import AdminClient
from controlplane.node import processes
from controlplane.node.sidecar import render_bootstrap
from controlplane.node.tools import find_consul, find_envoy
from controlplane.pipeline.spec import parse_pipeline


class Fleet:
    """Registrations through the agent's HTTP API."""

    def __init__(self, session: aiohttp.ClientSession, consul_port: int) -> None:
        self.session, self.base = session, f"http://127.0.0.1:{consul_port}/v1/agent/service"

    async def register(self, model: str, n: int, port: int) -> str:
        service_id = f"{model}-v1-bench-{n}"
        meta = {
            "model": model,
            "version": "v1",
            "runtime_port": str(port),
            "runtime_uds": f"/tmp/{service_id}.sock",
            "ingress_port": str(port),
            "egress_port": str(port),
            "egress_uds": f"/tmp/{service_id}-e.sock",
        }
        body = {
            "Name": model,
            "ID": service_id,
            "Address": "127.0.0.1",
            "Port": port,
            "Tags": ["mllambda"],
            "Meta": meta,
            "Check": {"TTL": "24h", "Status": "passing", "DeregisterCriticalServiceAfter": "1h"},
        }
        async with self.session.put(f"{self.base}/register", json=body) as resp:
            assert resp.status == 200, await resp.text()
        return service_id

    async def deregister(self, service_id: str) -> None:
        async with self.session.put(f"{self.base}/deregister/{service_id}") as resp:
            assert resp.status == 200, await resp.text()

    async def fill(self, models: int, per_model: int) -> None:
        limit = asyncio.Semaphore(16)

        async def one(m: int, n: int) -> None:
            async with limit:
                await self.register(f"m{m}", n, 20000 + m * per_model + n)

        total = models * per_model
        for start in range(0, total, 500):
            jobs = [one(i // per_model, i % per_model) for i in range(start, min(total, start + 500))]
            await asyncio.gather(*jobs)
            print(f"  registered {min(total, start + 500)}/{total}", flush=True)

    async def churn(self, models: int, stop: asyncio.Event) -> None:
        """Instances come and go elsewhere in the fleet, ~10 per second."""
        n = 10_000
        while not stop.is_set():
            n += 1
            service_id = await self.register(f"m{random.randrange(1, models)}", n, 40000 + n % 20000)
            await asyncio.sleep(0.05)
            await self.deregister(service_id)
            await asyncio.sleep(0.05)


def gateway_hosts(admin_port: int, cluster: str) -> set[str]:
    _, text = processes.http_get(f"http://127.0.0.1:{admin_port}/clusters")
    return {
        line.split("::")[1]
        for line in text.splitlines()
        if line.startswith(f"{cluster}::") and "::health_flags::" in line
    }


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def consul_connections(pid: int, consul_port: int) -> int:
    out = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if f"pid={pid}," in line and f":{consul_port} " in line + " ")


async def until(condition: Callable[[], bool], timeout: float = 30) -> bool:
    """Poll every 5 ms; False if `timeout` seconds pass first."""
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def measure(
    fleet: Fleet, admin: AdminClient, gateway_admin: int, models: int, samples: int, label: str
) -> dict[str, Any]:
    stop = asyncio.Event()
    churn = asyncio.create_task(fleet.churn(models, stop))
    applies = []
    for i in range(samples):
        spec = parse_pipeline(
            {
                "name": f"apply-{i % 5}",
                "stages": [{"name": "s", "timeout_ms": 1000 + i, "variants": [{"model": "m0", "version": "v1"}]}],
            }
        )
        started = time.perf_counter()
        await asyncio.to_thread(admin.apply, spec)
        applies.append(time.perf_counter() - started)
    eds = []
    for i in range(samples):
        port = 30000 + i
        started = time.perf_counter()
        service_id = await fleet.register("m0", 90_000 + i, port)
        host = f"127.0.0.1:{port}"
        if not await until(lambda h=host: h in gateway_hosts(gateway_admin, "m0.v1")):  # type: ignore[misc]
            raise RuntimeError(f"{label}: registration {i} did not reach the gateway in 30 s")
        eds.append(time.perf_counter() - started)
        await fleet.deregister(service_id)
        await until(lambda h=host: h not in gateway_hosts(gateway_admin, "m0.v1"))  # type: ignore[misc]
    stop.set()
    await churn
    return {"apply": applies, "eds": eds}


async def main(args: argparse.Namespace) -> None:
    consul, envoy = find_consul(), find_envoy()
    assert consul and envoy, "run ./dev bootstrap first"
    folder = Path(tempfile.mkdtemp(prefix="mll-consul-scale-"))
    ports = {k: processes.free_port() for k in ("http", "dns", "serf_lan", "serf_wan", "server", "grpc")}
    started: list[processes.ManagedProcess] = []
    try:
        agent = processes.ManagedProcess(
            "consul", processes.consul_dev_argv(consul, folder / "consul", ports), folder / "consul.log"
        ).start()
        started.append(agent)
        agent.wait_ready(processes.consul_ready(ports["http"]), timeout=30)
        xds, admin_port, gateway_port, gateway_admin = (processes.free_port() for _ in range(4))
        argv = [
            sys.executable,
            "-m",
            "controlplane.cli",
            "controlplane",
            f"--xds=127.0.0.1:{xds}",
            f"--admin=127.0.0.1:{admin_port}",
            f"--consul=127.0.0.1:{ports['http']}",
            f"--gateway-port={gateway_port}",
            f"--gateway-admin-port={gateway_admin}",
        ]
        plane = processes.ManagedProcess("controlplane", argv, folder / "controlplane.log").start()
        started.append(plane)
        plane.wait_ready(processes.tcp_ready(admin_port), timeout=30)
        config = folder / "gateway.yaml"
        config.write_text(render_bootstrap("gateway", "gateway", f"127.0.0.1:{xds}", gateway_admin))
        gateway = processes.ManagedProcess("envoy", processes.envoy_argv(envoy, config), folder / "gateway.log").start()
        started.append(gateway)
        gateway.wait_ready(processes.tcp_ready(gateway_admin), timeout=30)
        admin = AdminClient(f"127.0.0.1:{admin_port}").__enter__()
        pid = plane.pid
        results: dict[str, dict[str, float]] = {}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
            fleet = Fleet(session, ports["http"])
            small = max(2, args.baseline // args.per_model)
            big = args.services // args.per_model
            for label, models in (("baseline", small), ("fleet", big)):
                print(
                    f"{label}: registering {models * args.per_model} instances of {models} model versions", flush=True
                )
                await fleet.fill(models, args.per_model)
                await asyncio.sleep(3)  # discovery reads the fleet
                rounds = []
                for r in range(args.runs):
                    rounds.append(await measure(fleet, admin, gateway_admin, models, args.samples, label))
                    print(f"  run {r + 1}/{args.runs} done", flush=True)
                results[label] = {
                    "instances": models * args.per_model,
                    "apply_p50": median([percentile(x["apply"], 50) for x in rounds]),
                    "apply_p99": median([percentile(x["apply"], 99) for x in rounds]),
                    "eds_p50": median([percentile(x["eds"], 50) for x in rounds]),
                    "eds_p99": median([percentile(x["eds"], 99) for x in rounds]),
                    "rss": rss_mib(pid),
                    "connections": consul_connections(pid, ports["http"]),
                }
        print("\n" + report(results))
    finally:
        for proc in reversed(started):
            proc.stop()
        shutil.rmtree(folder, ignore_errors=True)


def report(results: dict[str, dict[str, float]]) -> str:
    lines = [
        "| fleet | instances | Apply p50 | Apply p99 | registration -> gateway EDS p50 | EDS p99 "
        "| control-plane RSS | connections to Consul |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        lines.append(
            f"| {label} | {r['instances']:,.0f} | {r['apply_p50'] * 1000:.1f} ms | {r['apply_p99'] * 1000:.1f} ms "
            f"| {r['eds_p50'] * 1000:.0f} ms | {r['eds_p99'] * 1000:.0f} ms | {r['rss']:.0f} MiB "
            f"| {r['connections']:.0f} |"
        )
    b, f = results["baseline"], results["fleet"]
    lines.append(
        f"\nratios fleet/baseline: Apply p99 {f['apply_p99'] / b['apply_p99']:.2f}, "
        f"EDS p99 {f['eds_p99'] / b['eds_p99']:.2f}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=2000, help="instances in the large fleet")
    parser.add_argument("--baseline", type=int, default=20, help="instances in the small fleet")
    parser.add_argument("--per-model", type=int, default=5, help="instances per model version")
    parser.add_argument("--samples", type=int, default=60, help="Apply calls and registrations per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per phase (medians are quoted)")
    asyncio.run(main(parser.parse_args()))
