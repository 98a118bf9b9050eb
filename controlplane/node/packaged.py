"""A model package on this host: fetched if missing, checked, its environment built, its model served there.

`mllambda runtime --package` runs the model in the package's own environment
(`python -m runtime_sdk.child`) while this process keeps the sidecar and the
certificate; `mllambda prepare M:V` does only the first half, for an init container
that fills a volume the runtime container then starts from (docs/architecture.md,
"Model packages").
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import shutil
import signal
import subprocess
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import consul.aio

from contract.naming import DEFAULT_KV_PREFIX
from contract.service import RuntimeService
from controlplane.config import ConsulAddress, add_security_flag, cache_dir, model_store_dir, resolve
from controlplane.consul import client as consul_client
from controlplane.consul.certs import CertKeeper, client_context, key_copies
from controlplane.errors import CliError
from controlplane.models.envs import prepare
from controlplane.models.formats import BATCH_ENTRY
from controlplane.models.package import PackageError
from controlplane.models.store import (
    BadPackage,
    ModelNotFound,
    ModelStore,
    ModelStoreUnavailable,
    read_blob,
    write_blob,
)
from controlplane.node.processes import ManagedProcess
from runtime_sdk.serve import ServeError, ServeOptions

log = logging.getLogger("mllambda.runtime")


@dataclass(frozen=True)
class Prepared:
    folder: Path  # the package's files
    env: Path  # its environment
    entry: str
    loader: str


async def serve_in_env(
    package: Prepared, options: ServeOptions, service: RuntimeService, c: ConsulAddress, sidecar: ManagedProcess | None
) -> None:
    """The model in its own environment (`python -m runtime_sdk.child`), stopped on SIGTERM or if the sidecar dies."""
    spec = {
        "options": asdict(options),
        "service": {f.name: getattr(service, f.name) for f in fields(service)},
        "consul": {"host": c.host, "port": c.port, "scheme": c.scheme, "token": c.token, "ca_file": c.ca_file},
        "through_sidecar": sidecar is not None,
    }
    child = await asyncio.create_subprocess_exec(
        str(package.env / "bin" / "python"),
        "-m",
        "runtime_sdk.child",
        cwd=package.folder,
        stdin=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(package.folder), "MLLAMBDA_CACHE_DIR": str(cache_dir())},
    )
    assert child.stdin is not None
    child.stdin.write(json.dumps(spec).encode() + b"\n")
    await child.stdin.drain()
    child.stdin.close()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    exited = asyncio.create_task(child.wait())
    while not exited.done():
        if stop.is_set() or (sidecar is not None and not sidecar.alive()):
            child.send_signal(signal.SIGTERM)  # it deregisters and drains, as a runtime in this process would
            break
        await asyncio.wait({exited}, timeout=0.5)
    code = await exited
    if sidecar is not None and not sidecar.alive():
        raise ServeError(f"the Envoy sidecar exited:\n{sidecar.tail()}")
    if code not in (0, -signal.SIGTERM) and not stop.is_set():
        raise ServeError(f"the model's process exited with {code} (its output is above)")


async def prepared_package(args: argparse.Namespace, client: consul.aio.Consul) -> Prepared:
    """The package of --package M:V from the store, checked against its digest, with its environment built."""
    kv_prefix = resolve(args.kv_prefix, "MLLAMBDA_KV_PREFIX", DEFAULT_KV_PREFIX)
    store = ModelStore(client, model_store_dir(args.model_store), kv_prefix)
    try:
        record = await store.get(args.model, args.version)
        try:
            archive = read_blob(store.dir, record.digest)
        except ModelNotFound:  # this host never had it: from the control plane, checked, kept by digest
            archive = await fetch_package(args, client, record.digest)
            write_blob(store.dir, record.digest, archive)
        log.info(
            "package model=%s version=%s digest=%s: preparing its environment",
            args.model,
            args.version,
            record.digest[:12],
        )
        folder, env, meta = await asyncio.to_thread(prepare, archive, record.digest, cache_dir())
    except (ModelNotFound, BadPackage, PackageError, ModelStoreUnavailable) as err:
        raise CliError(f"--package {args.model}:{args.version}: {err}") from err
    entry = BATCH_ENTRY if meta.format and args.max_batch else meta.entry  # a saved model batches by itself
    return Prepared(folder, env, entry, meta.loader)


async def fetch_package(args: argparse.Namespace, client: consul.aio.Consul, digest: str) -> bytes:
    """The archive from the control plane at --packages-from; under mTLS as this model's Connect identity."""
    address = resolve(args.packages_from, "MLLAMBDA_PACKAGES_ADDR", "")
    if not address:
        raise ModelNotFound(
            f"this host's store ({model_store_dir(args.model_store)}) lacks the package {digest[:12]}: share that "
            "folder, or give --packages-from HOST:PORT of a control plane started with --packages"
        )
    log.info("package model=%s version=%s: fetching it from %s", args.model, args.version, address)
    from controlplane.models.server import fetch  # aiohttp's server side: only for a host that fetches

    if args.security != "mtls":
        return await fetch(address, args.model, args.version, None)
    keeper, folder = CertKeeper(client, args.model), key_copies("fetch")
    try:
        identity = await keeper.start()
        return await fetch(address, args.model, args.version, client_context(identity, folder))
    finally:
        await keeper.stop()
        shutil.rmtree(folder, ignore_errors=True)


def prepare_ref(args: argparse.Namespace) -> Prepared:
    """The package of `args.ref` (MODEL:VERSION) on this host, its environment built."""
    args.model, _, args.version = args.ref.partition(":")
    if not args.version:
        raise CliError(f"{args.ref!r}: expected MODEL:VERSION")

    async def run() -> Prepared:
        client = consul_client.connect(ConsulAddress.from_settings(args.consul))
        try:
            return await prepared_package(args, client)
        finally:
            await client.close()

    return asyncio.run(run())


def cmd_prepare(args: argparse.Namespace) -> int:
    """`mllambda prepare M:V`: the package in this host's store and its environment built, nothing served."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    ready = prepare_ref(args)
    print(f"model/{args.ref} ready: {ready.folder} in environment {ready.env}")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    """`mllambda test M:V`: the package's examples through its predict, in its own environment; exit 1 on a failure."""
    ready = prepare_ref(args)
    examples = json.loads((ready.folder / ".mllambda" / "package.json").read_text()).get("examples", "")
    if not examples:
        raise CliError(f"model/{args.ref} has no examples: name a JSON-lines file as `examples:` in its manifest")
    done = subprocess.run(
        [str(ready.env / "bin" / "python"), "-m", "runtime_sdk.examples", examples],
        cwd=ready.folder,
        capture_output=True,
        text=True,
        timeout=args.timeout,
        env={**os.environ, "PYTHONPATH": str(ready.folder)},
    )
    results = []
    for line in done.stdout.splitlines():
        try:
            results.append(json.loads(line))
        except ValueError:
            continue
    counts = collections.Counter(r.get("status") for r in results)
    for result in results:
        if result.get("status") in ("failed", "error"):
            why = result.get("error") or "; ".join(result.get("differences", []))
            print(f"example {result['n']}: {result['status']}: {why}")
    summary = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "error", "ran") if counts[k])
    print(f"model/{args.ref}: {len(results)} examples: {summary or 'none'}")
    if done.returncode not in (0, 1) or not results:
        raise CliError(f"the examples did not run: {(done.stderr.strip().splitlines() or ['(no output)'])[-1]}")
    return 1 if counts["failed"] or counts["error"] else 0


def add_package_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-store", help="folder of model packages (MLLAMBDA_MODEL_STORE; .mllambda/models)")
    parser.add_argument(
        "--packages-from",
        help="a control plane's --packages HOST:PORT, for packages this host lacks (MLLAMBDA_PACKAGES_ADDR)",
    )


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("prepare", help="fetch a model package into this host's store and build its environment")
    parser.add_argument("ref", metavar="MODEL:VERSION")
    parser.add_argument("--consul", help="Consul HTTP address (default: CONSUL_HTTP_ADDR or 127.0.0.1:8500)")
    parser.add_argument("--kv-prefix", help="pipeline KV prefix of the control plane (MLLAMBDA_KV_PREFIX)")
    add_security_flag(parser, "fetch the package as the model's Connect identity")
    add_package_flags(parser)
    parser.set_defaults(handler=cmd_prepare)
    test = sub.add_parser("test", help="run a model version's examples in its own environment (exit 1 on a failure)")
    test.add_argument("ref", metavar="MODEL:VERSION")
    test.add_argument("--consul", help="Consul HTTP address (default: CONSUL_HTTP_ADDR or 127.0.0.1:8500)")
    test.add_argument("--kv-prefix", help="pipeline KV prefix of the control plane (MLLAMBDA_KV_PREFIX)")
    test.add_argument("--timeout", type=float, default=600.0, help="seconds for all examples")
    add_security_flag(test, "fetch the package as the model's Connect identity")
    add_package_flags(test)
    test.set_defaults(handler=cmd_test)
