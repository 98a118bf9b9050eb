"""Config changes under load: failed requests per 1,000 changes, and apply -> in traffic, per kind of change.

A real stack (Consul, control plane, gateway, seven runtimes with sidecars, a
tansu broker) serves pipeline `churn` to 8 clients that never pause, while
this applies changes in a cycle through every kind: weights, a stage inserted
and removed, a branch stage and its branches swapped, HTTP <-> Unix sockets <->
Kafka. "In traffic" is when the gateway Envoy has acknowledged the route that
enters the new version (the admin API's Status, polled every 5 ms).

Run: .venv/bin/python -m bench.config_changes [--changes 220]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import percentile, running_stack
from bench.pipeline_hops import MODELS
from controlplane.admin.client import AdminClient
from controlplane.pipeline.spec import parse_pipeline

TEXT = {"text": "a b c"}
TOKENIZE = {"name": "tokenize", "variants": [{"model": "tokenize", "version": "v1"}]}
COUNT = {"name": "count", "variants": [{"model": "count", "version": "v1"}]}
CLASSIFY = {"name": "classify", "variants": [{"model": "classify", "version": "v1"}]}
ANSWERS = {
    "score:v1": {"count": 3, "score": 30},
    "score:v2": {"count": 3, "score": 300},
    "short:v1": {"category": "short", "answer": "short text"},
    "long:v1": {"category": "short", "answer": "long text"},
}


def score(v1: int, v2: int) -> dict[str, Any]:
    variants = [{"model": "score", "version": v, "weight": w} for v, w in (("v1", v1), ("v2", v2)) if w]
    return {"name": "score", "variants": variants}


def answer(swapped: bool) -> dict[str, Any]:
    short, long = ("long", "short") if swapped else ("short", "long")
    branches = [
        {"key": "short", "variants": [{"model": short, "version": "v1"}]},
        {"key": "long", "variants": [{"model": long, "version": "v1"}]},
    ]
    return {"name": "answer", "branch_on": "category", "branches": branches}


# (kind of change, transport, stages): applied in this order, again and again.
CYCLE = [
    ("weights", "http", [TOKENIZE, COUNT, score(90, 10)]),
    ("stage insert", "http", [TOKENIZE, COUNT, CLASSIFY, score(90, 10)]),
    ("http -> uds", "uds", [TOKENIZE, COUNT, CLASSIFY, score(90, 10)]),
    ("stage removal", "uds", [TOKENIZE, COUNT, score(90, 10)]),
    ("uds -> kafka", "kafka", [TOKENIZE, COUNT, score(90, 10)]),
    ("kafka -> http", "http", [TOKENIZE, COUNT, score(50, 50)]),
    ("branch stage", "http", [TOKENIZE, COUNT, CLASSIFY, answer(False)]),
    ("branch change", "http", [TOKENIZE, COUNT, CLASSIFY, answer(True)]),
    ("http -> kafka", "kafka", [TOKENIZE, COUNT, CLASSIFY, answer(True)]),
    ("kafka -> uds", "uds", [TOKENIZE, COUNT, score(1, 0)]),
    ("uds -> http", "http", [TOKENIZE, COUNT, score(1, 0)]),
]


def check(status: int, body: Any, served: str) -> bool:
    last = served.rsplit(",", 1)[-1].split("=")[-1].strip()
    return status == 200 and ANSWERS.get(last) == body


async def load(url: str, stop: asyncio.Event, outcomes: collections.Counter[str], during: dict[str, Any]) -> None:
    """Requests back to back; each one's latency is filed under the change in progress when it started."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while not stop.is_set():
            kind, started = during["kind"], time.perf_counter()
            try:
                async with session.post(url, json=TEXT) as resp:
                    body = await resp.json(content_type=None)
                    ok = check(resp.status, body, resp.headers.get("x-mll-served", ""))
                    outcomes["ok" if ok else f"{resp.status} {json.dumps(body)[:80]}"] += 1
            except (aiohttp.ClientError, TimeoutError) as err:
                outcomes[type(err).__name__] += 1
            during["latency"][kind].append((time.perf_counter() - started) * 1000)


def apply_and_time(admin: AdminClient, spec: dict[str, Any], limit: float = 60) -> float:
    started = time.perf_counter()
    version = admin.apply(parse_pipeline(spec)).pipeline.version
    while not admin.gateway_has(spec["name"], version):
        if time.perf_counter() - started > limit:
            raise SystemExit(f"version {version} not in traffic after {limit:.0f}s: see mllambda describe")
        time.sleep(0.005)
    return (time.perf_counter() - started) * 1000


async def run(ports: dict[str, int], changes: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{ports['gateway']}/pipelines/churn"
    outcomes: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()
    with AdminClient(f"127.0.0.1:{ports['admin']}") as admin:
        first = {"name": "churn", "transport": "http", "stages": [TOKENIZE, COUNT, score(1, 0)]}
        await asyncio.to_thread(apply_and_time, admin, first)
        during: dict[str, Any] = {"kind": "steady", "latency": collections.defaultdict(list)}
        clients = [asyncio.create_task(load(url, stop, outcomes, during)) for _ in range(8)]
        took: dict[str, list[float]] = collections.defaultdict(list)
        for n in range(changes):
            kind, transport, stages = CYCLE[n % len(CYCLE)]
            during["kind"] = kind
            spec = {"name": "churn", "transport": transport, "stages": stages}
            took[kind].append(await asyncio.to_thread(apply_and_time, admin, spec))
            await asyncio.sleep(0.05)
        await asyncio.sleep(1)
        stop.set()
        await asyncio.gather(*clients)
    failed = sum(count for outcome, count in outcomes.items() if outcome != "ok")
    return {
        "changes": changes,
        "requests": sum(outcomes.values()),
        "failed": failed,
        "failed_per_1000_changes": round(1000 * failed / changes, 2),
        "failures": {k: v for k, v in outcomes.items() if k != "ok"},
        "apply_to_in_traffic_ms": {
            kind: {"n": len(ms), "p50": round(percentile(ms, 50), 1), "p99": round(percentile(ms, 99), 1)}
            for kind, ms in took.items()
        },
        "request_ms_during_change": {
            kind: {"p50": round(percentile(ms, 50), 1), "p99": round(percentile(ms, 99), 1), "max": round(max(ms), 1)}
            for kind, ms in during["latency"].items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--changes", type=int, default=220)
    args = parser.parse_args()
    runtimes = [
        {"model": model, "version": version, "target": f"{MODELS}:{target}"}
        for target, model, version in [
            ("tokenize", "tokenize", "v1"),
            ("count", "count", "v1"),
            ("length_class", "classify", "v1"),
            ("score", "score", "v1"),
            ("score_v2", "score", "v2"),
            ("short_model", "short", "v1"),
            ("long_model", "long", "v1"),
        ]
    ]
    folder = Path(tempfile.mkdtemp(prefix="mll-bench-changes-"))
    with running_stack(folder, {"name": "bench-changes", "runtimes": runtimes, "kafka": True}) as (ports, _):
        print(json.dumps(asyncio.run(run(ports, args.changes)), indent=1))


if __name__ == "__main__":
    main()
