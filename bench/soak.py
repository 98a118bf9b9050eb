"""A soak: the NLP stack under steady open-loop load while faults drawn from a seed hit it; every request counted.

Three pipelines at once over the NLP example's models: `soak-http`, `soak-uds` and `soak-kafka` (HTTP over
TCP, over Unix sockets, and Kafka topics behind the gateway's bridge). Each gets `--rate` requests per second
(open loop: sent on schedule whether or not earlier ones answered) of three texts whose category is known, so
every answer is checked (the category, and the chain that served it names that category's network).

Every `--every` seconds (jittered by the seed) one fault, drawn by the seed:
  kill-runtime     SIGKILL a runtime replica (its launcher; its sidecar and model process go with it)
  stop-sidecar     SIGSTOP a runtime's sidecar Envoy for 5 s, then SIGCONT
  kill-plane       SIGKILL the control plane
  kill-consul      SIGKILL the dev Consul agent (the supervisor starts it and gives its KV back)
  kill-kafka       SIGKILL the Kafka broker (the supervisor starts it again; tansu keeps topics in memory)
  change           apply soak-http changed, in turn: the sports split 90/10, Unix sockets, the network stage
                   removed, back to the start
  scale            `mllambda deploy` a category network with 2 replicas, the next time back to 1
  rotate-ca        a new root in Consul's Connect CA (every leaf certificate is replaced)
Each failed request is charged to the last fault before it if it came within `--window` seconds; others are
"unexplained". Besides the HTTP callers, `--kafka-rate` messages per second, each with an id in a header, go
straight to soak-kafka's input topic; every id is looked for in its output and dead-letter topics: lost,
delivered more than once (at least once: counted and explained), dead-lettered. Every process of the stack
(and each runtime's sidecar) is sampled every 10 s: RSS, open file descriptors, threads; the report gives each
one's slope per hour (a least-squares line).

Run: .venv/bin/python -m bench.soak [--minutes 3] [--seed 7] [--rate 10] [--kafka-rate 5] [--rounds] [--calm S]
(tests/test_soak.py runs it for a few minutes: every kind but the broker kill, in rounds, and a calm end.)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import random
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.common import nlp_stack, running_stack
from contract.naming import dead_letter_topic, input_topic, output_topic
from controlplane.config import PROJECT_ROOT
from controlplane.stack.up import stack_processes as recorded_processes

TEXTS = {
    "the striker scored a brilliant goal": "sports",
    "my laptop keeps crashing after the update": "tech",
    "the pasta was delicious and fresh": "food",
}
FAULTS = ("kill-runtime", "stop-sidecar", "kill-plane", "kill-consul", "kill-kafka", "change", "scale", "rotate-ca")
KILLED = {"kill-plane": "controlplane", "kill-consul": "consul", "kill-kafka": "kafka"}  # fault -> process
CHANGES = ("sports 90/10", "uds", "network stage removed", "as at the start")
ID = "soak-id"  # the Kafka header that carries a message's id through every stage
NLP = PROJECT_ROOT / "examples" / "nlp"


def pipelines() -> list[dict[str, Any]]:
    found = []
    for name, source in (
        ("soak-http", "stack"),
        ("soak-uds", "pipeline-uds.yaml"),
        ("soak-kafka", "pipeline-kafka.yaml"),
    ):
        if source == "stack":
            spec = dict(yaml.safe_load((NLP / "stack.yaml").read_text())["pipelines"][0])
        else:
            spec = dict(yaml.safe_load((NLP / source).read_text()))
        spec["name"] = name
        spec.pop("kind", None)
        found.append(spec)
    return found


@dataclass
class Book:
    started: float = field(default_factory=time.monotonic)
    outcomes: list[tuple[float, str, int, bool]] = field(default_factory=list)  # (t, pipeline, status, right)
    faults: list[tuple[float, str, str]] = field(default_factory=list)  # (t, kind, target)
    samples: dict[str, list[tuple[float, int, int, int]]] = field(default_factory=dict)  # name -> (t, rss, fds, thr)
    produced: dict[str, float] = field(default_factory=dict)  # Kafka id -> when the broker acknowledged it
    refused: int = 0  # messages the broker did not acknowledge (not accepted: not counted as lost)
    seen: collections.Counter[str] = field(default_factory=collections.Counter)  # ids on the output topic
    dead: collections.Counter[str] = field(default_factory=collections.Counter)  # ids on the dead-letter topic
    reasons: dict[tuple[str, int], list[str]] = field(default_factory=dict)  # (pipeline, status) -> first bodies
    cli_failures: list[str] = field(default_factory=list)  # a change or a scaling the CLI refused


def right_answer(status: int, body: Any, served: str, text: str, pipeline: str) -> bool:
    """The category the text is known to have, and a chain that names no other category's network (the network
    stage may be removed by a change; over Kafka the bridge's answer names no chain)."""
    if status != 200 or not isinstance(body, dict) or body.get("category") != TEXTS[text]:
        return False
    networks = {part.split(":")[0].split("=")[-1] for part in served.split(", ") if "net-" in part}
    return "kafka" in pipeline or networks <= {f"net-{TEXTS[text]}"}


async def one(session: aiohttp.ClientSession, url: str, pipeline: str, text: str, book: Book) -> None:
    sent = time.monotonic()
    try:
        async with session.post(url, json={"text": text}, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            body = await resp.json(content_type=None)
            right = right_answer(resp.status, body, resp.headers.get("x-mll-served", ""), text, pipeline)
            book.outcomes.append((sent, pipeline, resp.status, right))
            if resp.status != 200:
                kept = book.reasons.setdefault((pipeline, resp.status), [])
                if len(kept) < 3:  # the first few of each kind, for the report
                    kept.append(f"{time.monotonic() - book.started:.1f}s {str(body)[:200]}")
    except (aiohttp.ClientError, TimeoutError, ValueError):
        book.outcomes.append((sent, pipeline, 0, False))


async def load(port: int, pipeline: str, rate: float, until: float, book: Book) -> None:
    url = f"http://127.0.0.1:{port}/pipelines/{pipeline}"
    texts = list(TEXTS)
    pending: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as session:
        n = 0
        start = time.monotonic()
        while time.monotonic() < until:
            task = asyncio.create_task(one(session, url, pipeline, texts[n % len(texts)], book))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        await asyncio.gather(*pending)


async def kafka_load(bootstrap: str, pipeline: str, rate: float, until: float, book: Book) -> None:
    """Messages with ids straight to the pipeline's input topic; one is accepted once the broker acknowledged it."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    texts = list(TEXTS)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", request_timeout_ms=5000)
    await producer.start()
    try:
        n = 0
        start = time.monotonic()
        while time.monotonic() < until:
            key = f"{n:08d}"
            body = json.dumps({"text": texts[n % len(texts)]}).encode()
            try:
                await asyncio.wait_for(
                    producer.send_and_wait(input_topic(pipeline), body, headers=[(ID, key.encode())]), 10
                )
                book.produced[key] = time.monotonic()
            except (KafkaError, TimeoutError):
                book.refused += 1
            n += 1
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
    finally:
        await producer.stop()


async def kafka_watch(bootstrap: str, pipeline: str, stop: asyncio.Event, book: Book) -> None:
    """Every id that reaches the output or dead-letter topic (read from the start, no group: nothing is missed)."""
    from aiokafka import AIOKafkaConsumer

    out, dlq = output_topic(pipeline), dead_letter_topic(pipeline)
    consumer = AIOKafkaConsumer(out, dlq, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=500)
            for part, records in batches.items():
                for record in records:
                    key = dict(record.headers or []).get(ID)
                    if key is not None:
                        (book.seen if part.topic == out else book.dead)[key.decode()] += 1
    finally:
        await consumer.stop()


def stack_processes(state: Path) -> dict[str, int]:
    """The stack's processes that are still the ones recorded (a PID of one that exited may be another's now)."""
    return {p["name"]: int(p["pid"]) for p in recorded_processes(state) if p["alive"]}


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def sidecar_of(launcher: int) -> int | None:
    for child in children(launcher):
        try:
            if Path(f"/proc/{child}/comm").read_text().strip() == "envoy":
                return child
        except OSError:
            continue
    return None


def sample(state: Path, book: Book) -> None:
    now = time.monotonic() - book.started
    watched = dict(stack_processes(state))
    for name, pid in list(watched.items()):
        envoy = sidecar_of(pid)
        if envoy is not None:
            watched[f"{name} (sidecar)"] = envoy
    for name, pid in watched.items():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if "VmRSS" not in fields:  # exiting (a zombie): nothing to sample
            continue
        rss = int(fields["VmRSS"].split()[0]) * 1024
        threads = int(fields["Threads"])
        book.samples.setdefault(name, []).append((now, rss, fds, threads))


def rotate_ca(consul_port: int, folder: Path) -> None:
    key = folder / f"ca-{time.monotonic_ns()}.key"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)], check=True)
    config = {"Provider": "consul", "Config": {"PrivateKey": key.read_text(), "LeafCertTTL": "72h"}}
    request = urllib.request.Request(
        f"http://127.0.0.1:{consul_port}/v1/connect/ca/configuration", data=json.dumps(config).encode(), method="PUT"
    )
    urllib.request.urlopen(request, timeout=10).close()


async def faults(
    rng: random.Random,
    ports: dict[str, int],
    env: dict[str, str],
    folder: Path,
    every: float,
    until: float,
    book: Book,
    kinds: tuple[str, ...] = FAULTS,
    rounds: bool = False,
) -> None:
    """A fault every ~`every` s until `until`: drawn one by one, or with `rounds` each kind once per round in an
    order drawn by the seed (a short run then meets every kind)."""
    state = Path(env["MLLAMBDA_STATE_DIR"])
    changes = 0
    scaled: set[str] = set()
    queue: list[str] = []
    while time.monotonic() + every < until:
        await asyncio.sleep(every * rng.uniform(0.7, 1.3))
        if rounds:
            queue = queue or rng.sample(kinds, len(kinds))
            kind = queue.pop(0)
        else:
            kind = rng.choice(kinds)
        procs = stack_processes(state)
        runtimes = sorted(n for n in procs if n not in ("consul", "controlplane", "gateway", "kafka", "supervisor"))
        target = ""
        sidecars = {name: envoy for name in runtimes if (envoy := sidecar_of(procs[name]))}  # runtimes serving
        if (kind in KILLED and KILLED[kind] not in procs) or (
            kind in ("kill-runtime", "stop-sidecar") and not sidecars
        ):
            if rounds:
                queue.insert(0, kind)  # between a restart and its record: this kind again at the next turn
            continue
        if kind == "kill-runtime":
            target = rng.choice(sorted(sidecars))
            os.killpg(procs[target], signal.SIGKILL)
        elif kind == "stop-sidecar":
            target = rng.choice(sorted(sidecars))
            envoy = sidecars[target]
            os.kill(envoy, signal.SIGSTOP)
            asyncio.get_running_loop().call_later(5, os.kill, envoy, signal.SIGCONT)
            target += " (sidecar, 5 s)"
        elif kind in KILLED:
            target = KILLED[kind]
            os.killpg(procs[target], signal.SIGKILL)
        elif kind == "change":
            target = f"soak-http: {CHANGES[changes % len(CHANGES)]}"
            path = folder / "change.yaml"
            path.write_text(yaml.safe_dump(changed(changes)))
            changes += 1
            await mllambda(env, book, "apply", "-f", str(path))
        elif kind == "scale":
            model = rng.choice(["net-sports", "net-tech", "net-food"])
            replicas = 1 if model in scaled else 2
            scaled ^= {model}
            target = f"{model}:v1 to {replicas} replicas"
            await mllambda(env, book, "deploy", f"{model}:v1", f"--replicas={replicas}")
        elif kind == "rotate-ca":
            await asyncio.to_thread(rotate_ca, ports["consul"], folder)
        book.faults.append((time.monotonic(), kind, target))
        print(f"{time.monotonic() - book.started:7.1f}s  fault {kind} {target}", flush=True)


def changed(n: int) -> dict[str, Any]:
    """soak-http after its n-th change (CHANGES, in turn)."""
    spec = pipelines()[0]
    step = CHANGES[n % len(CHANGES)]
    if step == "sports 90/10":
        v1, v2 = ({"model": "net-sports", "version": v, "weight": w} for v, w in (("v1", 90), ("v2", 10)))
        spec["stages"][2]["branches"][0]["variants"] = [v1, v2]
    elif step == "uds":
        spec["transport"] = "uds"
    elif step == "network stage removed":
        spec["stages"] = spec["stages"][:2]
    return spec


async def mllambda(env: dict[str, str], book: Book, *args: str) -> None:
    """Run the CLI; a refusal is recorded and printed (the soak goes on: a change refused is a finding)."""
    cli = [str(PROJECT_ROOT / ".venv" / "bin" / "mllambda"), *args]
    done = await asyncio.to_thread(subprocess.run, cli, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        book.cli_failures.append(f"mllambda {' '.join(args)}: {done.stderr.strip()[-300:]}")
        print(f"  {book.cli_failures[-1]}", flush=True)


async def sampler(state: Path, until: float, book: Book) -> None:
    while time.monotonic() < until:
        await asyncio.to_thread(sample, state, book)
        await asyncio.sleep(10)


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in points) / var * 3600


@dataclass
class Verdict:
    """What a run shows: each request's outcome charged to the fault before it, and each Kafka id's fate."""

    outcomes: dict[str, collections.Counter[str]]  # pipeline -> "requests", "wrong answers", "failed (<cause>)"
    charged: collections.Counter[str]  # failures by the fault before them ("unexplained": none within the window)
    wrong: int
    lost: list[str]  # Kafka ids acknowledged by the broker and found on neither topic
    lost_to_broker: list[str]  # of those, acknowledged in the window before a broker kill (its memory)
    twice: int  # ids on the output topic more than once (at least once: counted, not lost)
    dead: int  # ids dead-lettered (and not delivered)


def judge(book: Book, window: float) -> Verdict:
    charged: collections.Counter[str] = collections.Counter()
    outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    wrong = 0
    for t, pipeline, status, right in book.outcomes:
        outcomes[pipeline]["requests"] += 1
        if status == 200 and not right:
            wrong += 1
            outcomes[pipeline]["wrong answers"] += 1
        elif status != 200:
            before = [f for f in book.faults if f[0] <= t <= f[0] + window]
            cause = before[-1][1] if before else "unexplained"
            charged[cause] += 1
            outcomes[pipeline][f"failed ({cause})"] += 1
    lost = [k for k in book.produced if not book.seen[k] and not book.dead[k]]
    broker = [
        k
        for k in lost
        if any(kind == "kill-kafka" and t - window <= book.produced[k] <= t for t, kind, _ in book.faults)
    ]
    return Verdict(
        outcomes=dict(outcomes),
        charged=charged,
        wrong=wrong,
        lost=lost,
        lost_to_broker=broker,
        twice=sum(1 for k in book.produced if book.seen[k] > 1),
        dead=sum(1 for k in book.produced if book.dead[k] and not book.seen[k]),
    )


def kafka_report(book: Book, verdict: Verdict, window: float) -> None:
    if not book.produced and not book.refused:
        return
    print(
        f"  kafka ids: {len(book.produced)} acknowledged by the broker ({book.refused} not), "
        f"{sum(1 for k in book.produced if book.seen[k])} on the output topic, {verdict.twice} of them more than "
        f"once ({sum(book.seen.values()) - len(book.seen)} extra copies), {verdict.dead} dead-lettered, "
        f"lost {len(verdict.lost)} ({len(verdict.lost_to_broker)} acknowledged in the {window:g} s before a broker "
        "kill: its memory)"
    )
    for key in [k for k in verdict.lost if k not in verdict.lost_to_broker][:10]:
        print(f"    lost {key}, acknowledged at {book.produced[key] - book.started:.1f} s")


def report(book: Book, window: float, minutes: float, seed: int) -> None:
    verdict = judge(book, window)
    print(f"\nsoak: {minutes:g} min, seed {seed}, {len(book.faults)} faults")
    for pipeline, counts in sorted(verdict.outcomes.items()):
        print(f"  {pipeline:<12} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        statuses = collections.Counter(str(status) for _, p, status, _ in book.outcomes if p == pipeline)
        print(f"  {'':<12} by status: {dict(sorted(statuses.items()))}")
    for (pipeline, status), bodies in sorted(book.reasons.items()):
        print(f"    {pipeline} {status}: " + " | ".join(bodies))
    print(f"  failed, by the fault before them (within {window:g} s): {dict(verdict.charged) or 'none'}")
    print(f"  wrong answers: {verdict.wrong}")
    for failure in book.cli_failures:
        print(f"  a fault's command failed: {failure}")
    kafka_report(book, verdict, window)
    print(f"  faults: {collections.Counter(kind for _, kind, _ in book.faults)}")
    print(f"\n  {'process':<34}{'RSS MB':>8}{'MB/h':>8}{'fds':>6}{'fds/h':>8}{'thr':>5}{'thr/h':>7}  samples")
    for name, points in sorted(book.samples.items()):
        last = points[-1]
        rss = slope_per_hour([(t, r / 2**20) for t, r, _, _ in points])
        fds = slope_per_hour([(t, float(f)) for t, _, f, _ in points])
        thr = slope_per_hour([(t, float(h)) for t, _, _, h in points])
        row = f"  {name:<34}{last[1] / 2**20:>8.0f}{rss:>8.1f}{last[2]:>6}{fds:>8.1f}{last[3]:>5}{thr:>7.1f}"
        print(f"{row}  {len(points)}")


async def soak(args: argparse.Namespace, ports: dict[str, int], env: dict[str, str], folder: Path) -> Book:
    book = Book()
    for spec in pipelines():
        path = folder / f"{spec['name']}.yaml"
        path.write_text(yaml.safe_dump(spec))
        cli = [str(PROJECT_ROOT / ".venv" / "bin" / "mllambda"), "apply", "-f", str(path), "--wait"]
        await asyncio.to_thread(subprocess.run, cli, env=env, check=True, capture_output=True, timeout=180)
    await asyncio.sleep(5)
    until = time.monotonic() + args.minutes * 60
    calm_from = until - args.calm  # no fault after this
    rng = random.Random(args.seed)
    state = Path(env["MLLAMBDA_STATE_DIR"])
    bootstrap = f"127.0.0.1:{ports['kafka']}"
    stop = asyncio.Event()
    watcher = asyncio.create_task(kafka_watch(bootstrap, "soak-kafka", stop, book))
    await asyncio.gather(
        *(load(ports["gateway"], p["name"], args.rate, until, book) for p in pipelines()),
        kafka_load(bootstrap, "soak-kafka", args.kafka_rate, until, book),
        faults(rng, ports, env, folder, args.every, calm_from, book, tuple(args.faults.split(",")), args.rounds),
        sampler(state, until, book),
    )
    for _ in range(60):  # seconds for the last messages' way through (a redelivery after a fault takes longer)
        if all(book.seen[k] or book.dead[k] for k in book.produced):
            break
        await asyncio.sleep(1)
    stop.set()
    await watcher
    return book


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second per pipeline")
    parser.add_argument("--faults", default=",".join(FAULTS), help="the kinds to draw from, comma-separated")
    parser.add_argument("--kafka-rate", type=float, default=5.0, help="messages per second straight to Kafka")
    parser.add_argument("--every", type=float, default=20.0, help="seconds between faults (jittered)")
    parser.add_argument("--window", type=float, default=30.0, help="seconds a fault is charged with failures")
    parser.add_argument("--rounds", action="store_true", help="each kind once per round (seeded order)")
    parser.add_argument(
        "--calm", type=float, default=0.0, help="seconds at the end with no fault (the stack recovered)"
    )
    args = parser.parse_args()
    if unknown := set(args.faults.split(",")) - set(FAULTS):
        parser.error(f"--faults: {', '.join(sorted(unknown))} not among {', '.join(FAULTS)}")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # a broker kill is a planned fault: no log per retry
    folder = Path(tempfile.mkdtemp(prefix="mll-bench-soak-"))
    stack = nlp_stack()
    stack["name"] = "soak"
    with running_stack(folder, stack) as (ports, env):
        book = asyncio.run(soak(args, ports, env, folder))
    raw = folder / "outcomes.jsonl"  # every request and fault, for a later look at what the summary folds
    raw.write_text(
        "".join(
            json.dumps({"t": round(t - book.started, 3), "pipeline": p, "status": s, "right": r}) + "\n"
            for t, p, s, r in book.outcomes
        )
        + "".join(
            json.dumps({"t": round(t - book.started, 3), "fault": k, "target": x}) + "\n" for t, k, x in book.faults
        )
    )
    report(book, args.window, args.minutes, args.seed)
    print(f"  (raw outcomes: {raw}; logs in {folder})")


if __name__ == "__main__":
    main()
