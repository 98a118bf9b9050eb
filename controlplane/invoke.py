"""`mllambda invoke PIPELINE --data JSON`: one request (or --count N) through the gateway."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from contract.headers import SERVED, TIMING
from controlplane.errors import CliError
from controlplane.stack.up import stack_processes

DEFAULT_GATEWAY = "http://127.0.0.1:18080"


def read_data(data: str) -> Any:
    text = data
    if data.startswith("@"):
        try:
            text = sys.stdin.read() if data == "@-" else Path(data[1:]).read_text()
        except OSError as err:
            raise CliError(f"cannot read {data[1:]}: {err.strerror}") from err
    try:
        return json.loads(text)
    except ValueError as err:
        raise CliError(f"--data is not valid JSON: {err}") from err


def parse_served(header: str) -> list[tuple[str, str]]:
    """'features=features:v1, network=net-food:v2' -> [(stage, model:version), ...]"""
    return [tuple(part.strip().split("=", 1)) for part in header.split(",") if "=" in part]  # type: ignore[misc]


@dataclass
class Sent:
    bodies: list[Any] = field(default_factory=list)
    served: list[str] = field(default_factory=list)
    hops: list[list[HopCost]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class HopCost:
    """Where one hop's time went (ms): in the model, in the runtime SDK around it, and in the mesh on the way in
    (the caller's sidecar, this stage's sidecar, the network; for the first hop the gateway and the client's leg)."""

    stage: str
    model_ms: float
    sdk_ms: float
    mesh_ms: float


def hop_costs(timing: str, wall_ms: float) -> list[HopCost]:
    """From x-mll-timing (`stage=model/runtime/next` per hop) and what the client waited."""
    costs: list[HopCost] = []
    before = wall_ms
    for part in timing.split(","):
        stage, _, numbers = part.strip().partition("=")
        try:
            model, runtime, after = numbers.split("/")
            model_ms, runtime_ms = float(model), float(runtime)
            next_ms = None if after == "-" else float(after)
        except ValueError:
            return costs  # not ours, or cut short: what was read so far
        costs.append(HopCost(stage, model_ms, runtime_ms - model_ms - (next_ms or 0), before - runtime_ms))
        if next_ms is None:
            break
        before = next_ms
    return costs


async def send(url: str, payload: Any, count: int, concurrency: int = 8) -> Sent:
    sent = Sent()
    queue = iter(range(count))

    async def worker(session: aiohttp.ClientSession) -> None:
        for _ in queue:
            started = time.perf_counter()
            try:
                async with session.post(url, json=payload) as resp:
                    body = await resp.json(content_type=None)
                    wall_ms = (time.perf_counter() - started) * 1000
                    if resp.status == 200:
                        sent.bodies.append(body)
                        sent.served.append(resp.headers.get(SERVED, ""))
                        sent.hops.append(hop_costs(resp.headers.get(TIMING, ""), wall_ms))
                    else:
                        sent.errors.append(f"HTTP {resp.status}: {json.dumps(body)}")
            except aiohttp.ClientConnectorError as err:
                sent.errors.append(
                    f"cannot reach the gateway: {err}\nhint: is the stack up (./dev up)? "
                    "The gateway is --gateway or MLLAMBDA_GATEWAY."
                )
            except (aiohttp.ClientError, ValueError) as err:
                sent.errors.append(f"{type(err).__name__}: {err}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(min(concurrency, count))))
    return sent


def hop_table(hops: list[list[HopCost]]) -> list[dict[str, Any]]:
    """Per stage, the median of each part over the requests that passed it."""
    by_stage: dict[str, list[HopCost]] = collections.defaultdict(list)
    for chain in hops:
        for cost in chain:
            by_stage[cost.stage].append(cost)
    return [
        {
            "stage": stage,
            **{
                part: round(statistics.median(getattr(c, part) for c in costs), 2)
                for part in ("model_ms", "sdk_ms", "mesh_ms")
            },
        }
        for stage, costs in by_stage.items()
    ]


def split_table(served: list[str]) -> dict[str, collections.Counter[str]]:
    by_stage: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for header in served:
        for stage, variant in parse_served(header):
            by_stage[stage][variant] += 1
    return by_stage


def cmd_invoke(args: argparse.Namespace) -> int:
    gateway = (args.gateway or os.environ.get("MLLAMBDA_GATEWAY") or DEFAULT_GATEWAY).rstrip("/")
    url = f"{gateway}/pipelines/{args.pipeline}"
    payload = read_data(args.data)
    try:
        sent = asyncio.run(send(url, payload, args.count))
    except OSError as err:
        raise CliError(f"cannot reach the gateway at {gateway}: {err}\nhint: is the stack up (./dev up)?") from err
    bodies, served, errors, hops = sent.bodies, sent.served, sent.errors, hop_table(sent.hops)
    if args.count == 1:
        if errors:
            raise CliError(errors[0])
        if args.output == "json":
            print(json.dumps({"result": bodies[0], "served_by": dict(parse_served(served[0])), "hops": hops}, indent=2))
        else:
            print(json.dumps(bodies[0], indent=2))
            print("served by: " + " -> ".join(f"{s} {v}" for s, v in parse_served(served[0])))
            print_hops(hops, "")
        return 0
    table = split_table(served)
    if args.output == "json":
        split = {stage: dict(counter) for stage, counter in table.items()}
        summary = {"requests": args.count, "ok": len(bodies), "errors": len(errors), "split": split, "hops": hops}
        print(json.dumps(summary, indent=2))
    else:
        print(f"{args.count} requests: {len(bodies)} ok, {len(errors)} failed")
        print(f"{'STAGE':<16}{'MODEL:VERSION':<28}{'COUNT':>7}{'SHARE':>9}")
        for stage, counter in table.items():
            total = sum(counter.values())
            for variant, n in sorted(counter.items()):
                print(f"{stage:<16}{variant:<28}{n:>7}{100 * n / total:>8.1f}%")
        print_hops(hops, "medians, ")
        for error in sorted(set(errors))[:5]:
            print(f"error: {error}")
    return 1 if errors and not bodies else 0


def print_hops(hops: list[dict[str, Any]], what: str) -> None:
    if not hops:
        return
    print(f"time per hop ({what}ms): model | runtime SDK | mesh on the way in (sidecars, network)")
    for hop in hops:
        print(f"  {hop['stage']:<16}{hop['model_ms']:>8.2f}{hop['sdk_ms']:>8.2f}{hop['mesh_ms']:>8.2f}")


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("invoke", help="send a request through the gateway and show which models served it")
    parser.add_argument("pipeline")
    parser.add_argument("--data", required=True, help="JSON payload, or @file (@- for stdin)")
    parser.add_argument("--count", type=int, default=1, help="send N requests and print the observed split")
    parser.add_argument("--gateway", help=f"gateway URL (MLLAMBDA_GATEWAY, default {DEFAULT_GATEWAY})")
    parser.add_argument("-o", "--output", choices=["text", "json"], default="text")
    parser.set_defaults(handler=cmd_invoke)
    status = sub.add_parser("status", help="pipelines, configured vs observed traffic, and Envoy ACK/NACK state")
    status.add_argument("--dashboard", help="control plane dashboard URL (MLLAMBDA_DASHBOARD, http://127.0.0.1:18002)")
    status.add_argument("-o", "--output", choices=["table", "json"], default="table")
    status.set_defaults(handler=cmd_status)


def print_processes(found: list[dict[str, Any]]) -> None:
    """The local stack's processes, as its supervisor recorded them: restarts, and how a failing one ended."""
    print(f"{'STACK PROCESS':<28}{'PID':>8}  {'STATE':<11}{'RESTARTS':>9}  LAST EXIT")
    for p in found:
        state = p.get("state", "running") if p["alive"] else p.get("state", "gone")
        print(f"{p['name']:<28}{p['pid']:>8}  {state:<11}{p.get('restarts', 0):>9}  {p.get('last_exit', '')}")
        if state == "failing":
            for line in str(p.get("last_lines", "")).splitlines()[-4:]:
                print(f"{'':<38}| {line[:100]}")
    print()


def cmd_status(args: argparse.Namespace) -> int:
    """The dashboard's picture as tables (from the control plane's /api/status)."""
    from controlplane.node.processes import http_get

    base = (args.dashboard or os.environ.get("MLLAMBDA_DASHBOARD") or "http://127.0.0.1:18002").rstrip("/")
    local = stack_processes()
    if local and args.output != "json":
        print_processes(local)
    try:
        code, body = http_get(f"{base}/api/status", timeout=10)
    except OSError as err:
        raise CliError(f"cannot reach the control plane at {base}: {err}\nhint: is the stack up (./dev up)?") from err
    if code != 200:
        raise CliError(f"{base}/api/status answered HTTP {code}")
    status = json.loads(body)
    if args.output == "json":
        print(json.dumps({**status, "stack_processes": local}, indent=2))
        return 0
    windows = {t["pipeline"]: t.get("window_seconds") for t in status["traffic"]}
    for p in status["pipelines"]:
        seen = windows.get(p["name"])
        over = f"  (observed over the last {seen:.0f} s of this version)" if seen is not None else ""
        quota = p.get("rate_limit")
        limited = status.get("rate_limited", {}).get(p["name"], 0)
        quota_text = f"  rate limit {quota['per_second']}/s: {limited} refused at the gateway" if quota else ""
        print(f"pipeline {p['name']}  version {p['version']}  transport {p['transport']}{quota_text}{over}")
    columns = f"{'PIPELINE':<14}{'STAGE':<12}{'BRANCH':<10}{'VARIANT':<22}{'WEIGHT':>8}{'OBSERVED':>10}"
    print(f"\n{columns}{'REQUESTS':>10}{'5XX':>6}{'REFUSED':>9}{'RETRIES':>9}{'P99 MS':>8}")
    for t in status["traffic"]:  # REFUSED: answered 429 or 503 by the variant's runtimes (flow control)
        observed = "-" if t["observed_share"] is None else f"{100 * t['observed_share']:.1f}%"
        p99 = "-" if t["p99_ms"] is None else f"{t['p99_ms']:.1f}"
        variant = f"{t['model']}:{t['version']}"
        weight = f"{100 * t['configured_share']:.1f}%"
        left = f"{t['pipeline']:<14}{t['stage']:<12}{t['branch']:<10}{variant:<22}{weight:>8}{observed:>10}"
        print(f"{left}{t['requests']:>10}{t['errors']:>6}{t.get('refused', 0):>9}{t['retries']:>9}{p99:>8}")
    if status.get("admission_by_caller"):
        from controlplane.admin.output import shown
        from controlplane.monitoring.callers import refused_text

        # per caller key at the runtimes (fairness), as of their last read
        print(f"\n{'ADMISSION BY CALLER':<24}{'CALLER':<26}{'ADMITTED':>9}  REFUSED")
        for row in status["admission_by_caller"]:
            name = f"{row['model']}:{row['version']}"
            caller = shown(row["caller"])[:25]
            print(f"{name:<24}{caller:<26}{row['admitted']:>9}  {refused_text(row['refused'])}")
    print(f"\n{'ENVOY NODE':<36}{'ACKED':<16}{'UPDATED':>9}  LAST NACK")
    for n in status["nodes"]:
        age = "-" if n["age_seconds"] is None else f"{n['age_seconds']:.0f}s ago"
        node = n["node"] if n["connected"] else f"{n['node']} (gone)"
        print(f"{node:<36}{n['acked']:<16}{age:>9}  {n['nack'][:80]}")
    if status.get("scaling"):
        print(f"\n{'AUTOSCALED':<24}{'WANTED':>7}{'PASSING':>8}{'BOUNDS':>8}  LAST DECISION")
        for row in status["scaling"]:
            wanted = "-" if row["wanted"] is None else row["wanted"]
            bounds = f"{row['min_replicas']}..{row['max_replicas']}"
            when = time.strftime("%H:%M:%S", time.localtime(row["decided_at"])) if row["decided_at"] else ""
            name = f"{row['model']}:{row['version']}"
            cold = f" (last cold start {row['cold_start_s']:.1f} s)" if row.get("cold_start_s") is not None else ""
            print(f"{name:<24}{wanted:>7}{row['passing']:>8}{bounds:>8}  {when} {row['reason']}{cold}")
    if status.get("failing"):  # deployed versions whose replicas keep exiting, as their stack reported
        from controlplane.admin.output import shown

        print(f"\n{'DEPLOYED, FAILING':<24}{'EXITS':>6}  {'AGAIN AT':<10}LAST LINES")
        for row in status["failing"]:
            again = time.strftime("%H:%M:%S", time.localtime(row["retry_at"]))
            lines = [shown(line)[:100] for line in str(row["tail"]).splitlines()[-4:]] or [""]
            print(f"{row['model'] + ':' + row['version']:<24}{row['failures']:>6}  {again:<10}| {lines[0]}")
            for line in lines[1:]:
                print(f"{'':<40}| {line}")
    if status.get("kafka_bridges"):
        print(f"\nkafka bridges: {', '.join(status['kafka_bridges'])}")
    return 0
