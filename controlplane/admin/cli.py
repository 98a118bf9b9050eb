"""kubectl-style commands on the admin API: apply -f, get, describe, history, rollback, delete."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from controlplane.admin import model_cli
from controlplane.admin.client import AdminClient, admin_client
from controlplane.admin.output import emit
from controlplane.errors import CliError
from controlplane.pipeline.model import InvalidPipeline
from controlplane.pipeline.spec import parse_pipeline

if TYPE_CHECKING:  # the generated messages, for annotations only (they are imported where used)
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb

RESOURCE = ("pipeline", "pipelines", "pl")
BY_RESOURCE = {
    "get": model_cli.get_models,
    "describe": model_cli.describe_model,
    "history": model_cli.history_model,
    "delete": model_cli.delete_model,
}


def for_models(command: str) -> Any:
    """Route `get|describe|history|delete model ...` to the model commands, pipelines to their own."""

    def wrapped(handler: Any) -> Any:
        def run(args: argparse.Namespace) -> int:
            if args.resource in model_cli.MODEL_RESOURCE:
                return int(BY_RESOURCE[command](args))
            return int(handler(args))

        return run

    return wrapped


def load_documents(path: str) -> list[dict[str, Any]]:
    """Read every YAML document of a file (`-` for stdin); problems name the document."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise CliError(f"{path} is not valid YAML: {err}") from err
    if not docs:
        raise CliError(f"{path} has no documents")
    return docs


def cmd_apply(args: argparse.Namespace) -> int:
    pipelines, problems = [], []
    for index, doc in enumerate(load_documents(args.filename)):
        where = f"{args.filename} document {index + 1}"
        kind = doc.get("kind", "Pipeline") if isinstance(doc, dict) else "Pipeline"
        if kind != "Pipeline":
            problems.append(f"{where}: kind {kind!r} cannot be applied (stack files go to `mllambda up -f`)")
            continue
        try:
            pipelines.append(parse_pipeline(doc))
        except InvalidPipeline as err:
            problems += [f"{where}: {p}" for p in err.problems]
    if problems:  # nothing is sent unless every document is valid
        raise CliError("invalid pipeline definition, nothing applied:\n  " + "\n  ".join(problems))
    with admin_client(args) as admin:
        applied = []
        for pipeline in pipelines:
            reply = admin.apply(pipeline, dry_run=args.dry_run)
            if args.dry_run:
                change = "would be changed" if reply.created else "unchanged"
                print(f"pipeline/{pipeline.name} valid, {change} (server dry run: nothing written)", flush=True)
                continue
            state = "created" if reply.created else "unchanged"
            print(f"pipeline/{pipeline.name} {state} (version {reply.pipeline.version})", flush=True)
            for warning in reply.warnings:
                print(f"  warning: {warning}")
            applied.append((pipeline.name, reply.pipeline.version))
        if args.wait and not args.dry_run:
            for name, version in applied:
                wait_in_traffic(admin, name, version, args.timeout)
    return 0


def wait_in_traffic(admin: AdminClient, name: str, version: int, timeout: float) -> None:
    """Until the gateway enters `version` (the staged switch is done), saying what it waits for."""
    started = time.monotonic()
    said = ""
    while not admin.gateway_has(name, version):
        note = next(iter(_switch_notes(admin, name)), "")
        if time.monotonic() - started > timeout:
            raise CliError(
                f"pipeline/{name} version {version} is not in traffic after {timeout:g}s"
                + (f": {note}" if note else " (is a gateway Envoy connected?)")
                + f"\nhint: `mllambda describe pipeline {name}` shows which Envoy has what"
            )
        if note and note != said:
            print(f"  {note}", flush=True)
            said = note
        time.sleep(0.1)
    print(f"pipeline/{name} version {version} in traffic ({time.monotonic() - started:.1f}s)", flush=True)


def _switch_notes(admin: AdminClient, name: str) -> list[str]:
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb

    return [w for w in admin.Status(pb.StatusRequest(name=name)).warnings if "not in traffic yet" in w]


def cmd_get(args: argparse.Namespace) -> int:
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb
    from controlplane.admin.convert import version_to_dict

    with admin_client(args) as admin:
        if args.name:
            versions = [admin.Get(pb.GetRequest(name=args.name)).pipeline]
        else:
            versions = list(admin.List(pb.ListRequest()).pipelines)
    rows = [
        [v.spec.name, str(v.version), v.spec.transport, str(len(v.spec.stages)), v.created_at, v.cause]
        for v in versions
    ]
    headers = ["NAME", "VERSION", "TRANSPORT", "STAGES", "CREATED", "CAUSE"]
    emit(args.output, [version_to_dict(v) for v in versions], headers, rows, one=bool(args.name))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb
    from controlplane.admin.convert import version_to_dict

    with admin_client(args) as admin:
        reply = admin.History(pb.HistoryRequest(name=args.name, limit=args.limit, before=args.before))
    versions = list(reply.versions)
    rows = [[str(v.version), v.created_at, v.cause, summary(v.spec)] for v in versions]
    emit(args.output, [version_to_dict(v) for v in versions], ["VERSION", "CREATED", "CAUSE", "STAGES"], rows, False)
    if reply.next_before:
        print(f"older versions: mllambda history {args.name} --before {reply.next_before}", file=sys.stderr)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb

    with admin_client(args) as admin:
        reply = admin.Rollback(pb.RollbackRequest(name=args.name, to_version=args.to_version))
    state = "rolled back" if reply.created else "unchanged"
    print(f"pipeline/{args.name} {state} to version {args.to_version} (now version {reply.pipeline.version})")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb

    with admin_client(args) as admin:
        reply = admin.Delete(pb.DeleteRequest(name=args.name))
    print(f"pipeline/{args.name} deleted (history kept, last version {reply.pipeline.version})")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb

    with admin_client(args) as admin:
        status = admin.Status(pb.StatusRequest(name=args.name))
    v = status.pipeline
    lines = [
        f"Name:       {v.spec.name}",
        f"Version:    {v.version} ({v.cause}, {v.created_at})",
        f"Transport:  {v.spec.transport}",
        "Stages:",
    ]
    for i, stage in enumerate(v.spec.stages):
        protocol = f" protocol={stage.protocol}" if stage.protocol not in ("", "json") else ""
        lines.append(f"  {i + 1}. {stage.name}  timeout={stage.timeout_ms}ms retries={stage.retry.attempts}{protocol}")
        lines += [f"       {variant_text(x)}" for x in stage.variants]
        for branch in stage.branches:
            lines.append(f"       branch {branch.key}: " + ", ".join(variant_text(x) for x in branch.variants))
        if stage.HasField("shadow"):
            s = stage.shadow
            lines.append(f"       shadow {s.model}:{s.version} {s.percent:g}% of requests")
        lines += member_lines(stage)
        for key, holder in [("", stage), *((b.key, b) for b in stage.branches)]:
            if holder.HasField("rollout"):
                lines.append("       " + rollout_text(holder.rollout, key))
    if status.contracts:
        lines += ["Contracts:", *[f"  {note}" for note in status.contracts]]
    lines.append("Envoy nodes:" if status.nodes else "Envoy nodes: none connected")
    for node in status.nodes:
        state = f"NACK {node.nack_version}: {node.nack_error}" if node.nack_error else "ok"
        carried = f"pipeline v{node.pipeline_version}" if node.pipeline_version else "pipeline not in config"
        lines.append(f"  {node.node_id:<32} acked={node.acked_version or '-'} {carried} {state}")
    lines += [f"Warning: {w}" for w in status.warnings]
    print("\n".join(lines))
    return 0


def member_lines(stage: pb.Stage) -> list[str]:
    """An ensemble's members, each with its split, and its join."""
    lines = []
    for m in stage.members:
        kind = "required" if m.required or not m.HasField("required") else "optional"
        lines.append(f"       member {m.name} ({kind}, timeout {m.timeout_ms}ms): " + variants_text(m))
        if m.HasField("shadow"):
            lines.append(f"         shadow {m.shadow.model}:{m.shadow.version} {m.shadow.percent:g}% of requests")
    if stage.HasField("join"):
        lines.append(f"       join {stage.join.model}:{stage.join.version}")
    return lines


def variants_text(holder: pb.Stage | pb.Member | pb.Branch) -> str:
    split = ", ".join(variant_text(x) for x in holder.variants)
    return split or "; ".join(
        f"branch {b.key}: " + ", ".join(variant_text(x) for x in b.variants) for b in holder.branches
    )


def rollout_text(r: pb.Rollout, branch: str) -> str:
    from controlplane.delivery.rollouts import state

    where = f" in branch {branch}" if branch else ""
    return f"rollout{where} to {r.candidate.model}:{r.candidate.version}: {state(r)} (steps {list(r.steps)})"


def variant_text(variant: pb.Variant) -> str:
    return f"{variant.model}:{variant.version} weight={variant.weight}"


def summary(spec: pb.PipelineSpec) -> str:
    parts = []
    for stage in spec.stages:
        names = [f"{x.model}:{x.version}" for x in stage.variants] or [f"{len(stage.branches)} branches"]
        names = [f"ensemble of {', '.join(m.name for m in stage.members)}"] if stage.members else names
        parts.append(f"{stage.name}[{','.join(names)}]")
    return " -> ".join(parts)


def add_command(sub: argparse._SubParsersAction) -> None:
    def add(name: str, help_text: str, handler: Any, resource: bool = True) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text)
        parser.add_argument("--server", help="admin API address (default: MLLAMBDA_ADMIN_ADDR or 127.0.0.1:18001)")
        if resource:
            parser.add_argument("resource", choices=RESOURCE + model_cli.MODEL_RESOURCE, metavar="pipeline|model")
            handler = for_models(name)(handler)
        parser.set_defaults(handler=handler)
        return parser

    apply = add("apply", "create or update pipelines from a YAML file", cmd_apply, resource=False)
    apply.add_argument("-f", "--filename", required=True, help="YAML file (several documents allowed; - for stdin)")
    apply.add_argument(
        "--wait", action="store_true", help="return once the gateway sends requests into the new version"
    )
    apply.add_argument("--timeout", type=float, default=60, help="seconds --wait waits (default 60)")
    apply.add_argument(
        "--dry-run", action="store_true", help="the control plane validates it all (Envoy's rules too), writes nothing"
    )
    get = add("get", "list pipelines or show one", cmd_get)
    get.add_argument("name", nargs="?", help="a pipeline; for models: MODEL or MODEL:VERSION")
    get.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    describe = add("describe", "show a pipeline, its stages and which Envoys have it", cmd_describe)
    describe.add_argument("name")
    history = add("history", "list every version of a pipeline", cmd_history)
    history.add_argument("name")
    history.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    history.add_argument("--limit", type=int, default=50, help="versions per page (at most 500)")
    history.add_argument("--before", type=int, default=0, help="only versions older than this one")
    rollback = add("rollback", "make an old version current again (as a new version)", cmd_rollback)
    rollback.add_argument("name")
    rollback.add_argument("--to-version", type=int, required=True)
    delete = add("delete", "stop serving a pipeline (history is kept), or delete a model version", cmd_delete)
    delete.add_argument("name")
