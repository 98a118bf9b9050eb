"""`mllambda replay PIPELINE --candidate FILE`: recorded requests through a candidate version, answers compared.

The candidate is pushed beside the live version as a trial (delivery/replays.py)
that only requests carrying its secret enter; this command reads the payload
log, sends the records at a bounded rate, judges every answer against its
record (delivery/replay_report.py), ends the trial with its report, prints it
and writes it as JSON. The live pipeline's versions are never written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from contract import oip
from contract.naming import pipeline_path
from controlplane.admin.cli import load_documents
from controlplane.admin.client import AdminClient, admin_client
from controlplane.config import payload_folders
from controlplane.delivery.replay_report import MAX_RECORDS, Answer, LogRead, Recorded, Tally, passes, read_log
from controlplane.errors import CliError
from controlplane.pipeline.model import InvalidPipeline, Pipeline
from controlplane.pipeline.spec import parse_pipeline
from controlplane.translate.pipelines import REPLAY

DEFAULT_GATEWAY = "http://127.0.0.1:18080"
DEFAULT_RATE, MAX_RATE = 20.0, 1000.0  # requests per second: live traffic keeps its latency (docs/benchmarks.md)
MAX_CONCURRENCY = 64
PROGRESS_EVERY = 2.0  # seconds


def _candidate(path: str, name: str) -> Pipeline:
    docs = load_documents(path)
    if len(docs) != 1:
        raise CliError(f"{path}: a candidate is one pipeline definition, found {len(docs)} documents")
    try:
        candidate = parse_pipeline(docs[0])
    except InvalidPipeline as err:
        raise CliError(f"{path}: invalid pipeline definition:\n  " + "\n  ".join(map(str, err.problems))) from err
    if candidate.name != name:
        raise CliError(f"{path} defines pipeline {candidate.name!r}; a candidate for {name!r} must have its name")
    return candidate


def log_files(given: list[str], name: str) -> list[Path]:
    """The payload log files to read, oldest first: those given, else the pipeline's rotated and current files."""
    if given:
        missing = [g for g in given if not Path(g).is_file()]
        if missing:
            raise CliError(f"no such log file: {', '.join(missing)}")
        return [Path(g) for g in given]
    for folder in payload_folders():
        found = [f for f in (folder / f"{name}.jsonl.1", folder / f"{name}.jsonl") if f.is_file()]
        if found:
            return found
    places = " or ".join(str(f) for f in payload_folders())
    raise CliError(
        f"no payload log of pipeline {name!r} in {places}\n"
        f"hint: turn logging on in its definition (`logging: {{percent: 5}}`) and send requests, or pass --log FILE"
    )


def _skipped(read: LogRead) -> str:
    return ", ".join(f"{n} {why}" for why, n in read.skipped.most_common()) or "none"


async def _send(
    url_base: str,
    name: str,
    secret: str,
    records: list[Recorded],
    rate: float,
    concurrency: int,
    timeout: float,
    tally: Tally,
) -> None:
    """Every record through the trial at `rate` per second with at most `concurrency` at once, judged as answered."""
    slots = asyncio.Semaphore(concurrency)
    started, last_said = time.monotonic(), 0.0
    loop = asyncio.get_running_loop()

    async def one(session: aiohttp.ClientSession, record: Recorded) -> None:
        path = oip.infer_path(name) if record.protocol == "oip" else pipeline_path(name)
        began = loop.time()
        try:
            async with session.post(url_base + path, json=record.request, headers={REPLAY: secret}) as resp:
                raw = await resp.read()
                body: Any
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
                answer = Answer(resp.status, body, resp.headers.get("x-mll-served", ""), (loop.time() - began) * 1000)
        except TimeoutError:
            answer = Answer(None, None, "", (loop.time() - began) * 1000, "timeout")
        except aiohttp.ClientError as err:
            answer = Answer(None, None, "", (loop.time() - began) * 1000, type(err).__name__)
        finally:
            slots.release()
        if record.protocol == "oip":  # the version an OIP answer names is the trial's, not the recorded one's
            for side in (answer.body, record.response):
                if isinstance(side, dict):
                    side.pop("model_version", None)
        tally.judge(record, answer)

    limits = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=limits, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        tasks = []
        for i, record in enumerate(records):
            await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
            await slots.acquire()
            tasks.append(asyncio.create_task(one(session, record)))
            if time.monotonic() - last_said > PROGRESS_EVERY:
                last_said = time.monotonic()
                t = tally.total
                print(
                    f"  replayed {t.requests}/{len(records)}: {t.equal} equal, {t.changed} changed, {t.failed} failed",
                    file=sys.stderr,
                    flush=True,
                )
        await asyncio.gather(*tasks)


def _wait_ready(admin: AdminClient, name: str, rid: str, timeout: float) -> None:
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb

    started, said = time.monotonic(), ""
    while True:
        state = admin.GetReplayState(pb.ReplayRef(pipeline=name, id=rid))
        if state.ready:
            print(f"candidate ready ({time.monotonic() - started:.1f}s)", file=sys.stderr, flush=True)
            return
        note = ", ".join(state.waiting_for)
        if time.monotonic() - started > timeout:
            raise CliError(f"the candidate's hops are not ready after {timeout:g}s: waiting for {note}")
        if note != said:
            print(f"  waiting for {note}", file=sys.stderr, flush=True)
            said = note
        time.sleep(0.1)


def cmd_replay(args: argparse.Namespace) -> int:
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb
    from controlplane.admin.convert import spec_to_proto

    name = args.pipeline
    if not 0 < args.rate <= MAX_RATE:
        raise CliError(f"--rate: above 0 and at most {MAX_RATE:g} requests per second")
    if not 0 < args.concurrency <= MAX_CONCURRENCY:
        raise CliError(f"--concurrency: 1 to {MAX_CONCURRENCY}")
    if not 0 < args.last <= MAX_RECORDS:
        raise CliError(f"--last: 1 to {MAX_RECORDS}")
    with admin_client(args) as admin:
        if args.end:
            admin.EndReplay(pb.EndReplayRequest(pipeline=name, id=args.end))
            print(f"replay {args.end} of pipeline/{name} ended (no report kept)")
            return 0
        if args.candidate is None:
            return _list(admin, name, args.output)
        candidate = _candidate(args.candidate, name)
        files = log_files(args.log, name)
        read = read_log(files, name, args.last, args.since)
        print(
            f"read {len(read.records)} records of pipeline/{name} from {', '.join(map(str, files))}"
            f" ({read.lines} lines; skipped: {_skipped(read)})",
            file=sys.stderr,
            flush=True,
        )
        if not read.records:
            raise CliError(f"no record to replay ({read.lines} lines read; skipped: {_skipped(read)})")
        request = pb.StartReplayRequest(candidate=spec_to_proto(candidate), ttl_seconds=args.ttl)
        trial = admin.StartReplay(request)
        for note in trial.notes:
            print(f"  note: {note}", file=sys.stderr)
        print(f"replay {trial.id}: {len(read.records)} requests at {args.rate:g}/s", file=sys.stderr, flush=True)
        report: dict[str, Any] = {}
        try:
            _wait_ready(admin, name, trial.id, args.ready_timeout)
            tally = Tally(args.tolerance)
            began = time.time()
            gateway = (args.gateway or os.environ.get("MLLAMBDA_GATEWAY") or DEFAULT_GATEWAY).rstrip("/")
            asyncio.run(
                _send(gateway, name, trial.secret, read.records, args.rate, args.concurrency, args.timeout, tally)
            )
            report = {
                **tally.report(),
                "started_at": began,
                "finished_at": time.time(),
                "rate": args.rate,
                "candidate_models": sorted(f"{m}:{v}" for m, v in candidate.models()),
                "log": {"files": [str(f) for f in files], "lines": read.lines, "skipped": dict(read.skipped)},
            }
        finally:  # the trial goes whatever happened; a report only for a replay that ran to its end
            admin.EndReplay(pb.EndReplayRequest(pipeline=name, id=trial.id, report_json=_fitted(report)))
    report["id"] = trial.id
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2) if args.output == "json" else _table(name, report))
    return 0 if passes(report, args.max_changed, args.max_failed) else 1


def _fitted(report: dict[str, Any]) -> str:
    """The report as kept by the control plane: examples dropped first if it is too large."""
    if not report:
        return ""
    text = json.dumps(report)
    return text if len(text) < 60_000 else json.dumps({**report, "examples": []})


def _table(name: str, r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    lines = [
        f"replay {r['id']} of pipeline/{name}: {r['requests']} requests, {r['equal_share']:.1%} equal, "
        f"{r['changed_share']:.1%} changed, {r['failed_share']:.1%} failed",
        f"latency p50/p99 ms: recorded {lat['recorded']['p50']}/{lat['recorded']['p99']}, "
        f"candidate {lat['candidate']['p50']}/{lat['candidate']['p99']}",
        "",
        f"{'REQUESTS':>8}  {'EQUAL':>6}  {'CHANGED':>7}  {'FAILED':>6}  SERVED BY THE CANDIDATE",
    ]
    for c in r["by_chain"]:
        lines.append(
            f"{c['requests']:>8}  {c['equal_share']:>6.1%}  {c['changed_share']:>7.1%}  "
            f"{c['failed_share']:>6.1%}  {c['chain']}"
        )
    if r["changed_fields"]:
        lines += ["", "changed fields: " + ", ".join(f"{k} ({n})" for k, n in list(r["changed_fields"].items())[:10])]
    if r["failed_by"]:
        lines += ["failed: " + ", ".join(f"{k} ({n})" for k, n in r["failed_by"].items())]
    return "\n".join(lines)


def _list(admin: AdminClient, name: str, output: str) -> int:
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb

    found = admin.ListReplays(pb.ListReplaysRequest(pipeline=name))
    reports = [json.loads(r) for r in found.reports_json]
    running = [{"id": t.id, "version": t.version, "expires_at": t.expires_at} for t in found.running]
    if output == "json":
        print(json.dumps({"running": running, "reports": reports}, indent=2))
        return 0
    for t in running:
        print(f"running  {t['id']}  (lapses in {t['expires_at'] - time.time():.0f}s)")
    for r in reports:
        print(
            f"done     {r.get('id')}  {r.get('requests')} requests, {r.get('equal_share', 0):.1%} equal, "
            f"{r.get('changed_share', 0):.1%} changed, {r.get('failed_share', 0):.1%} failed"
        )
    if not running and not reports:
        print(f"no replays of pipeline/{name}")
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay",
        help="send recorded requests through a candidate version (no live traffic) and compare the answers",
    )
    p.add_argument("pipeline")
    p.add_argument("--candidate", help="the candidate's YAML definition (without it: list this pipeline's replays)")
    p.add_argument(
        "--log",
        action="append",
        default=[],
        help="payload log file(s), oldest first (default: the "
        "pipeline's log in the local stack's or this user's run folder)",
    )
    p.add_argument("--last", type=int, default=1000, help=f"the newest N records (default 1000, at most {MAX_RECORDS})")
    p.add_argument("--since", default="", help="only records at or after this UTC time (2026-12-06T10:00:00Z)")
    p.add_argument("--rate", type=float, default=DEFAULT_RATE, help=f"requests per second (default {DEFAULT_RATE:g})")
    p.add_argument("--concurrency", type=int, default=4, help="requests at once (default 4)")
    p.add_argument("--timeout", type=float, default=30, help="seconds per request (default 30)")
    p.add_argument("--tolerance", type=float, default=1e-6, help="numbers this close are equal (relative or absolute)")
    p.add_argument("--max-changed", type=float, default=1.0, help="exit 1 if a larger share changed (default 1)")
    p.add_argument("--max-failed", type=float, default=0.0, help="exit 1 if a larger share failed (default 0)")
    p.add_argument("--report", help="also write the report here as JSON")
    p.add_argument("--ttl", type=int, default=600, help="seconds the trial may stay if this command dies (600)")
    p.add_argument("--ready-timeout", type=float, default=60, help="seconds to wait for the candidate's hops")
    p.add_argument("--gateway", help=f"gateway URL (MLLAMBDA_GATEWAY, default {DEFAULT_GATEWAY})")
    p.add_argument("--end", metavar="ID", help="end a running replay (one whose command died)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.add_argument("--server", help="admin API address (default: MLLAMBDA_ADMIN_ADDR or 127.0.0.1:18001)")
    p.set_defaults(handler=cmd_replay)
