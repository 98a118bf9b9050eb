"""`mllambda rollout status|pause|resume|promote|abort PIPELINE [--stage S]`.

Each action is the same move the driver makes, written through the admin API
as a new version with its cause, and only if the version it was judged on is
still current (a concurrent step wins; run the command again).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from controlplane.admin.cli import admin_client
from controlplane.delivery.rollouts import Spot, spots, state, user_move, where
from controlplane.errors import CliError
from controlplane.pipeline.model import Pipeline

ROLLOUT_CAUSES = ("rollout", "auto-rollback")


def _current(admin: Any, name: str) -> tuple[Pipeline, int]:
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb
    from controlplane.admin.convert import version_from_proto

    current = version_from_proto(admin.Get(pb.GetRequest(name=name)).pipeline)
    return current.pipeline, current.version


def _spot(p: Pipeline, stage: str | None, branch: str | None) -> Spot:
    found = [
        (k, key)
        for k, key in spots(p)
        if (stage is None or p.stages[k].name == stage) and (branch is None or key == branch)
    ]
    if not found:
        raise CliError(f"no rollout in progress there in pipeline {p.name!r}\nhint: mllambda rollout status {p.name}")
    if len(found) > 1:
        names = ", ".join(_name(p, spot) for spot in found)
        raise CliError(f"pipeline {p.name!r} has rollouts in {names}: choose one with --stage (and --branch)")
    return found[0]


def _name(p: Pipeline, spot: Spot) -> str:
    return p.stages[spot[0]].name + (f"[{spot[1]}]" if spot[1] else "")


def status(p: Pipeline, version: int, recent: list[tuple[int, str]]) -> dict[str, Any]:
    rollouts = []
    for spot in spots(p):
        _, r = where(p, spot)
        assert r is not None
        share = r.steps[r.step - 1] if r.step else 0
        rollouts.append(
            {
                "stage": _name(p, spot),
                "candidate": f"{r.candidate.model}:{r.candidate.version}",
                "state": state(r),
                "candidate_share_percent": share,
                "steps": list(r.steps),
                "analysis": {
                    "step_seconds": r.step_seconds,
                    "min_requests": r.min_requests,
                    "max_error_rate": r.max_error_rate,
                    "max_p99_ratio": r.max_p99_ratio,
                    "max_p99_ms": r.max_p99_ms,
                },
            }
        )
    moves = [{"version": v, "cause": c} for v, c in recent if c.startswith(ROLLOUT_CAUSES)]
    return {"pipeline": p.name, "version": version, "rollouts": rollouts, "recent_moves": moves[-10:]}


def cmd_rollout(args: argparse.Namespace) -> int:
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb

    with admin_client(args) as admin:
        p, version = _current(admin, args.name)
        if args.action == "status":
            reply = admin.History(pb.HistoryRequest(name=args.name, limit=50))
            found = status(p, version, [(int(v.version), v.cause) for v in reply.versions])
            if args.output == "json":
                print(json.dumps(found, indent=2))
                return 0
            for r in found["rollouts"]:
                print(
                    f"{args.name}/{r['stage']}: to {r['candidate']}, {r['state']}"
                    f" ({r['candidate_share_percent']}% of traffic); steps {r['steps']}"
                )
            if not found["rollouts"]:
                print(f"{args.name}: no rollout in progress (version {version})")
            for move in found["recent_moves"]:
                print(f"  v{move['version']}: {move['cause']}")
            return 0
        move = user_move(p, _spot(p, args.stage, args.branch), args.action)
        reply = admin.apply(move.pipeline, cause=move.cause, expect_version=version)
    print(f"pipeline/{args.name} version {reply.pipeline.version}: {move.cause}")
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("rollout", help="see or steer a stage's progressive rollout")
    parser.add_argument("action", choices=["status", "pause", "resume", "promote", "abort"])
    parser.add_argument("name", help="pipeline")
    parser.add_argument("--stage", help="the stage, when several have a rollout")
    parser.add_argument("--branch", help="the branch key, when the rollout moves a branch's split")
    parser.add_argument("-o", "--output", choices=["text", "json"], default="text")
    parser.add_argument("--server", help="admin API address (default: MLLAMBDA_ADMIN_ADDR or 127.0.0.1:18001)")
    parser.set_defaults(handler=cmd_rollout)
