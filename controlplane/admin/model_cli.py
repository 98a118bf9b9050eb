"""Model packages from the command line: `build`, `deploy`, `undeploy`, and models for get/describe/history/delete.

`mllambda build DIR --model M [--version V]` locks and packs DIR here (uv), checks
that its entry imports in the package's own environment (or, for a model saved by its
library, that the library opens it there, and records its signature), then uploads it through the
admin API in chunks. Without --version the version is `d-` and the first 12 hex
digits of the digest, so building the same content again names the same version.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from controlplane.admin.client import AdminClient, admin_client
from controlplane.admin.output import emit, shown
from controlplane.config import cache_dir
from controlplane.errors import CliError
from controlplane.models.envs import check_entry, ensure_env, find_uv, infer_contract, read_signature
from controlplane.models.formats import FORMATS
from controlplane.models.package import MANIFEST, Built, PackageError, PackageMeta, build, chunks, lock_hash

if TYPE_CHECKING:  # the generated messages, for annotations only (they are imported where used)
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb
MODEL_RESOURCE = ("model", "models", "mo")
UPLOAD_TIMEOUT = 600.0


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def build_checked(root: Path, manifest: str, check: bool = True, wanted_format: str = "") -> Built:
    """Lock and pack a model folder; with `check`, try it in its own environment (built if new) first:
    its entry imported, or a saved model opened by its library (which gives its signature)."""

    def tried(meta: PackageMeta, lock_text: str) -> PackageMeta:
        lock_id = lock_hash(lock_text, meta.python)
        say(f"    environment {lock_id[:12]} (shared by packages with the same lock)")
        env = ensure_env(cache_dir() / "envs", lock_text, lock_id, meta.python)
        if meta.format:
            signature = read_signature(env, root, meta)
            names = ", ".join(f["name"] for f in signature.get("inputs", []))
            say(f"    {meta.format} model {meta.model_file} loads in it; inputs: {names[:200]}")
            return replace(meta, signature=signature)
        check_entry(env, root, [t for t in (meta.entry, meta.loader) if t])
        say(f"    entry {meta.entry} imports in it")
        if meta.signature or not meta.examples:
            return meta
        inferred = infer_contract(env, root, meta)  # no contract declared: told by its examples, if they can
        if not inferred:
            say("    no contract inferred from its examples (one fails or is no object: `mllambda test` says which)")
            return meta
        reads, answers = (", ".join(f["name"] for f in inferred[side]) or "-" for side in ("inputs", "outputs"))
        say(f"    contract {inferred['kind']}: reads {reads[:200]}; answers {answers[:200]}")
        return replace(meta, signature=inferred)

    try:
        say(f"==> locking {root} for Python {sys.version_info.major}.{sys.version_info.minor} (uv)")
        built = build(root, find_uv(), manifest, wanted_format, tried if check else None)
        if built.meta.format:
            say(f"    format {built.meta.format} ({built.meta.model_file})")
        say(f"    {len(built.meta.files)} files, {len(built.archive) / 2**20:.1f} MiB, sha256 {built.digest[:12]}")
    except PackageError as err:
        raise CliError(str(err)) from err
    return built


def upload(admin: AdminClient, built: Built, model: str, version: str) -> bool:
    """Send a built package to the store through the admin API, in chunks. Created (else: already there)?"""
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb

    def messages() -> Iterator[pb.UploadChunk]:
        yield pb.UploadChunk(
            model=model, version=version, digest=built.digest, size=len(built.archive), built_by=builder()
        )
        for part in chunks(built.archive):
            yield pb.UploadChunk(data=part)

    return bool(admin.Upload(messages(), timeout=UPLOAD_TIMEOUT).created)


def builder() -> str:
    """user@host of whoever runs `build`, for the record (not an identity: the admin token is the credential)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def cmd_build(args: argparse.Namespace) -> int:
    started = time.monotonic()
    built = build_checked(Path(args.path), args.manifest, check=not args.no_check, wanted_format=args.format or "")
    version = args.version or f"d-{built.digest[:12]}"
    from controlplane.models.store import BadPackage, check_names  # Consul's and aiohttp's clients: only here

    try:
        check_names(args.model, version)
    except BadPackage as err:
        raise CliError(str(err)) from err
    with admin_client(args) as admin:
        created = upload(admin, built, args.model, version)
    state = "built" if created else "unchanged (this version already holds exactly this package)"
    print(f"model/{args.model}:{version} {state} in {time.monotonic() - started:.1f}s (sha256 {built.digest[:12]})")
    return 0


def get_models(args: argparse.Namespace) -> int:
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb

    model, version = split_ref(args.name) if args.name else ("", "")
    with admin_client(args) as admin:
        if version:
            found = [admin.GetModel(pb.ModelRef(model=model, version=version))]
        else:
            found = list(admin.ListModels(pb.ListModelsRequest(model=model)).models)
    rows = [
        [
            m.model,
            m.version,
            m.digest[:12],
            size_text(m.size),
            str(len(m.dependencies)),
            deployed_column(m),
            when(m.created_at),
        ]
        for m in found
    ]
    from google.protobuf.json_format import MessageToDict

    items = [MessageToDict(m, preserving_proto_field_name=True) for m in found]
    emit(args.output, items, ["MODEL", "VERSION", "DIGEST", "SIZE", "DEPS", "DEPLOYED", "CREATED"], rows, bool(version))
    return 0


def deployed_column(m: pb.ModelVersion) -> str:
    """`2`, `1..4` (autoscaled), with ` (failing)` while its replicas keep exiting; `-`: not deployed."""
    if not m.deployed:
        return "-"
    count = f"{m.autoscale.min_replicas}..{m.autoscale.max_replicas}" if m.HasField("autoscale") else str(m.replicas)
    return count + (" (failing)" if m.HasField("trouble") else "")


def describe_model(args: argparse.Namespace) -> int:
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb

    model, version = split_ref(args.name, required=True)
    with admin_client(args) as admin:
        m = admin.GetModel(pb.ModelRef(model=model, version=version))
    lines = [
        f"Model:        {m.model}:{m.version}",
        f"Digest:       sha256:{m.digest}",
        f"Size:         {size_text(m.size)} ({m.file_count} files)",
        f"Format:       {m.format} (served by runtime_sdk.formats)"
        if m.format
        else f"Entry:        {m.entry}" + (f" (loader {m.loader})" if m.loader else ""),
        f"Python:       {m.python}",
        f"Environment:  {m.lock_hash[:12]} (shared by versions with the same lock)",
        f"Created:      {when(m.created_at)} by {m.created_by}",
        f"Deployed:     {deployed_text(m)}",
        *trouble_lines(m),
        *signature_lines(m.signature_json, bool(m.format)),
        "Requirements: " + (", ".join(m.requirements) or "(none)"),
        "Dependencies (locked):",
        *[f"  {d}" for d in m.dependencies],
        "Files:",
        *[f"  {f}" for f in m.files],
    ]
    if m.file_count > len(m.files):
        lines.append(f"  ... and {m.file_count - len(m.files)} more")
    print("\n".join(lines))
    return 0


def deployed_text(m: pb.ModelVersion) -> str:
    if not m.deployed:
        return "no"
    if not m.HasField("autoscale"):
        return f"{m.replicas} replicas"
    a = m.autoscale
    p99 = f", or while p99 > {a.target_p99_ms:g} ms" if a.HasField("target_p99_ms") else ""
    return f"autoscaled, {a.min_replicas} to {a.max_replicas} replicas at {a.target_in_flight:g} in flight each{p99}"


def trouble_lines(m: pb.ModelVersion) -> list[str]:
    """Why a deployed version's replicas do not stay up, as its stack reported: the count, when, and their words."""
    if not m.HasField("trouble"):
        return []
    t = m.trouble
    again = "now" if t.retry_at <= time.time() else f"at {when(t.retry_at)}"
    return [
        f"Failing:      {t.failures} replica exit{'s' if t.failures > 1 else ''} in a row, the last at {when(t.at)};"
        f" the stack starts one again {again}",
        "  its last lines:",
        *[f"    {shown(line)}" for line in t.tail.splitlines()],
    ]


def signature_lines(text: str, saved_model: bool) -> list[str]:
    """A saved model's inputs and outputs, one line each: `name  DATATYPE [shape]`."""
    if not text:
        return ["Signature:    (not recorded: built with --no-check)"] if saved_model else []
    signature = json.loads(text)
    lines = [f"Signature:    {signature.get('kind', '')}"]
    for side in ("inputs", "outputs"):
        lines.append(f"  {side}:")
        lines += [f"    {f['name']}  {f['datatype']} {f['shape']}" for f in signature.get(side, [])]
    return lines


def history_model(args: argparse.Namespace) -> int:
    model, _ = split_ref(args.name)
    args.name = model
    return get_models(args)


def delete_model(args: argparse.Namespace) -> int:
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb

    model, version = split_ref(args.name, required=True)
    with admin_client(args) as admin:
        admin.DeleteModel(pb.ModelRef(model=model, version=version))
    print(f"model/{model}:{version} deleted")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb

    model, version = split_ref(args.ref, required=True)
    policy = {k: getattr(args, k) for k in AUTOSCALE_FLAGS if getattr(args, k) is not None}
    if args.autoscale and args.replicas is not None:
        raise CliError("--replicas or --autoscale, not both: an autoscaled version starts at --min")
    if policy and not args.autoscale:
        raise CliError(f"{', '.join(AUTOSCALE_FLAGS[k] for k in policy)}: only with --autoscale")
    for flag, value in (("--min", args.min_replicas), ("--max", args.max_replicas)):
        if value is not None and not 0 <= value <= 100:
            raise CliError(f"{flag}: between 0 and 100, got {value}")
    replicas = 1 if args.replicas is None else args.replicas
    if not 0 <= replicas <= 100:
        raise CliError(f"--replicas: between 0 and 100, got {replicas}")
    bounds = {"min_replicas": 1, "max_replicas": max(4, policy.get("min_replicas", 1))}  # the file's defaults
    autoscale = pb.DeployAutoscale(**{**bounds, **policy}) if args.autoscale else None
    with admin_client(args) as admin:
        request = pb.DeployRequest(model=model, version=version, replicas=replicas, autoscale=autoscale)
        reply = admin.Deploy(request)
    state = "deployed" if reply.changed else "unchanged"
    if autoscale is not None:
        a = reply.model.autoscale
        print(
            f"model/{model}:{version} {state}: autoscaled, {a.min_replicas} to {a.max_replicas} replicas at "
            f"{a.target_in_flight:g} in flight each (a running stack starts {a.min_replicas})"
        )
    else:
        print(f"model/{model}:{version} {state}: {replicas} replicas (a running stack starts them)")
    return 0


AUTOSCALE_FLAGS = {  # a policy's field -> its flag
    "min_replicas": "--min",
    "max_replicas": "--max",
    "target_in_flight": "--target-in-flight",
    "target_p99_ms": "--target-p99-ms",
}


def cmd_undeploy(args: argparse.Namespace) -> int:
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb

    model, version = split_ref(args.ref, required=True)
    with admin_client(args) as admin:
        admin.Undeploy(pb.UndeployRequest(model=model, version=version, force=args.force))
    print(f"model/{model}:{version} undeployed (its replicas drain and stop)")
    return 0


def split_ref(ref: str, required: bool = False) -> tuple[str, str]:
    model, _, version = ref.partition(":")
    if required and not version:
        raise CliError(f"{ref!r}: expected MODEL:VERSION (mllambda get models {model} lists its versions)")
    return model, version


def size_text(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 1024:.1f} KiB"


def when(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def add_command(sub: argparse._SubParsersAction) -> None:
    server_help = "admin API address (default: MLLAMBDA_ADMIN_ADDR or 127.0.0.1:18001)"
    build_parser = sub.add_parser("build", help="pack a model directory with its locked requirements into the store")
    build_parser.add_argument("path", help="directory with mllambda.yaml (kind: Model), the code, files, requirements")
    build_parser.add_argument("--model", required=True)
    build_parser.add_argument("--version", help="version name (default: d-<digest>, the same for the same content)")
    build_parser.add_argument("-f", "--manifest", default=MANIFEST, help="the manifest, a file in PATH (mllambda.yaml)")
    build_parser.add_argument(
        "--format", choices=FORMATS, help="the saved model's library, when the files leave it open (found otherwise)"
    )
    build_parser.add_argument("--no-check", action="store_true", help="skip trying the package in its environment")
    build_parser.add_argument("--server", help=server_help)
    build_parser.set_defaults(handler=cmd_build)
    deploy = sub.add_parser("deploy", help="run a model version's replicas on the running stack")
    deploy.add_argument("ref", metavar="MODEL:VERSION")
    deploy.add_argument("--replicas", type=int, help="replicas to run (default 1)")
    deploy.add_argument("--autoscale", action="store_true", help="replicas follow load between --min and --max")
    deploy.add_argument("--min", dest="min_replicas", type=int, help="with --autoscale: at least (default 1)")
    deploy.add_argument("--max", dest="max_replicas", type=int, help="with --autoscale: at most (default 4)")
    deploy.add_argument("--target-in-flight", type=float, help="with --autoscale: requests in flight per replica (4)")
    deploy.add_argument("--target-p99-ms", type=float, help="with --autoscale: also scale up while p99 is above")
    deploy.add_argument("--server", help=server_help)
    deploy.set_defaults(handler=cmd_deploy)
    undeploy = sub.add_parser("undeploy", help="drain and stop a model version's replicas")
    undeploy.add_argument("ref", metavar="MODEL:VERSION")
    undeploy.add_argument("--force", action="store_true", help="even while a pipeline in traffic sends to it")
    undeploy.add_argument("--server", help=server_help)
    undeploy.set_defaults(handler=cmd_undeploy)
