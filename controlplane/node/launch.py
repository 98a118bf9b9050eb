"""`mllambda runtime MODULE:CALLABLE --model M --version V`: pick ports, start the Envoy sidecar,
then hand over to the runtime SDK (serve, register, drain)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import consul.aio

from contract.naming import (
    DEFAULT_KV_PREFIX,
    LABEL,
    RESERVED_PREFIX,
    SERVICE_ID,
    VERSION,
    model_cluster,
    name_problem,
)
from contract.payload import MAX_BODY_CEILING
from contract.service import EGRESS_SOCKET, SOCKET_PATH_BYTES, RuntimeService, socket_path_fits
from controlplane.config import (
    DEFAULT_XDS_ADDR,
    ConsulAddress,
    add_security_flag,
    resolve,
    run_folder,
)
from controlplane.consul import client as consul_client
from controlplane.consul.certs import CertKeeper, write_sds
from controlplane.errors import CliError
from controlplane.files import private_dir
from controlplane.node.packaged import Prepared, add_package_flags, prepared_package, serve_in_env
from controlplane.node.processes import ManagedProcess, envoy_argv, free_port
from controlplane.node.sidecar import write_bootstrap
from controlplane.node.tools import find_envoy
from runtime_sdk.admission import MAX_WAIT
from runtime_sdk.serve import ServeError, ServeOptions, load_callable, remove_socket, serve
from runtime_sdk.wire import BODY_BUDGET, MAX_CONNECTIONS

log = logging.getLogger("mllambda.runtime")


MAX_BATCH = 4096


def run_dir() -> Path:
    folder = run_folder()
    try:
        return private_dir(folder)  # sockets live here
    except PermissionError as err:
        raise CliError(str(err)) from err


def advertised(args: argparse.Namespace) -> str:
    """The address other Envoys reach this sidecar's ingress at; it listens there. Beyond loopback only with
    mTLS: the ingress would otherwise take requests from anyone on the network."""
    address = args.advertise_address
    try:
        ip = ipaddress.ip_address(address)
    except ValueError as err:
        raise CliError(f"--advertise-address: an IP address of this host, got {address!r}") from err
    if not ip.is_loopback and args.security != "mtls":
        raise CliError(
            f"--advertise-address {address}: refusing to open the sidecar's ingress beyond loopback without "
            "mutual TLS\nhint: add --security mtls (every control plane and runtime of the deployment)"
        )
    return str(ip)


def add_advertise_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--advertise-address",
        default="127.0.0.1",
        help="IP this host's sidecar ingress listens on and registers in Consul (beyond loopback: mTLS only)",
    )


def checked_service_id(args: argparse.Namespace) -> str:
    """The names from the flags, held to the rules every entry point uses; the service id, given or made."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40]
    service_id = args.service_id or f"{args.model}-{args.version}-{host}-{os.getpid()}"
    names = [("--model", args.model, LABEL), ("--version", args.version, VERSION)]
    for flag, value, rule in [*names, ("--service-id", service_id, SERVICE_ID)]:
        problem = name_problem(value, rule)
        if problem is not None:
            raise CliError(f"{flag}: {problem}")
    if args.model.startswith(RESERVED_PREFIX):
        raise CliError(f"--model: names starting with {RESERVED_PREFIX!r} are ML Lambda's own identities")
    return service_id


def check_limits(args: argparse.Namespace) -> None:
    if args.max_body < 1:
        raise CliError(f"--max-body: at least 1 byte, got {args.max_body}")
    if not 1 <= args.max_connections <= 65536:
        raise CliError(f"--max-connections: between 1 and 65536, got {args.max_connections}")
    if not 1024 <= args.body_budget <= 2**40:
        raise CliError(f"--body-budget: from 1024 bytes to 1 TiB, got {args.body_budget}")
    if not 0 <= args.profile_percent <= 100:
        raise CliError(f"--profile-percent: between 0 (off) and 100, got {args.profile_percent:g}")
    if not 0 <= args.max_in_flight <= 65536:
        raise CliError(f"--max-in-flight: between 0 (no limit) and 65536, got {args.max_in_flight}")
    if not 0 <= args.queue <= 65536 or (args.queue and not args.max_in_flight):
        raise CliError(f"--queue: between 0 and 65536, and only with --max-in-flight, got {args.queue}")
    if not 0.01 <= args.queue_wait <= 600:
        raise CliError(f"--queue-wait: from 0.01 to 600 seconds, got {args.queue_wait:g}")
    if not 0 <= args.max_batch <= MAX_BATCH:
        raise CliError(f"--max-batch: between 0 (no batching) and {MAX_BATCH}, got {args.max_batch}")
    if not 0 < args.max_wait_ms <= 10_000:
        raise CliError(f"--max-wait-ms: more than 0 and at most 10000, got {args.max_wait_ms:g}")


def plan_service(args: argparse.Namespace, folder: Path, kafka: bool) -> RuntimeService:
    """The runtime's addresses: given by flags, else free ports and sockets under the run folder."""
    service_id = checked_service_id(args)
    runtime_uds = str(args.uds or folder / f"{service_id}.sock")
    if not socket_path_fits(runtime_uds):
        raise CliError(
            f"the runtime's socket path is {len(runtime_uds.encode())} bytes, over the {SOCKET_PATH_BYTES} a Unix "
            f"socket path can hold: {runtime_uds[:60]}...; set MLLAMBDA_RUN_DIR (or --uds) to a shorter path"
        )
    egress_uds = str(folder / f"{service_id}{EGRESS_SOCKET}")
    if not socket_path_fits(egress_uds):  # the egress socket is a shortcut only: TCP carries `uds` pipelines too
        log.warning("no egress socket: %s is over %d bytes; forwarding over TCP", egress_uds[:60], SOCKET_PATH_BYTES)
        egress_uds = ""
    return RuntimeService(
        service_id=service_id,
        model=args.model,
        version=args.version,
        host=advertised(args),
        runtime_port=args.port or free_port(),
        runtime_uds=runtime_uds,
        ingress_port=args.ingress_port or free_port(),
        egress_port=args.egress_port or free_port(),
        egress_uds=egress_uds,
        envoy_admin_port=args.envoy_admin_port or free_port(),
        health_port=free_port(),
        # Broker traffic goes through the sidecar when there is one.
        kafka_port=free_port() if kafka and not args.no_sidecar else 0,
    )


def start_sidecar(service: RuntimeService, xds_addr: str, folder: Path, concurrency: int | None) -> ManagedProcess:
    """The runtime's Envoy; with `service.tls_dir`, over mTLS to the control plane and every peer."""
    envoy = find_envoy()
    if envoy is None:
        raise CliError("envoy not found: run ./dev bootstrap, or pass --no-sidecar")
    config = write_bootstrap(
        folder / f"{service.service_id}-envoy.yaml",
        node_id=service.service_id,
        cluster=model_cluster(service.model, service.version),
        xds_addr=xds_addr,
        admin_port=service.envoy_admin_port,
        tls_dir=service.tls_dir,
    )
    remove_socket(service.egress_uds)
    argv = envoy_argv(envoy, config, concurrency)
    return ManagedProcess("sidecar", argv, folder / f"{service.service_id}-envoy.log", die_with_parent=True).start()


async def launch(args: argparse.Namespace) -> None:
    c = ConsulAddress.from_settings(args.consul, getattr(args, "consul_token", None))
    client = consul_client.connect(c)
    try:
        package = await prepared_package(args, client) if args.package else None
        if package is None:
            for target in (args.target, args.loader):
                if target:
                    load_callable(target)  # a typo fails here, before an Envoy is started for it
        await _launch(args, client, c, package)
    finally:
        await client.close()


async def _launch(
    args: argparse.Namespace, client: consul.aio.Consul, c: ConsulAddress, package: Prepared | None
) -> None:
    kafka = resolve(args.kafka_bootstrap, "MLLAMBDA_KAFKA_BOOTSTRAP", "")
    folder = run_dir()
    service = plan_service(args, folder, bool(kafka))
    options = ServeOptions(
        predict=package.entry if package else args.target,
        loader=(package.loader if package else args.loader) or "",
        inline=args.inline,
        max_body=args.max_body,
        max_connections=args.max_connections,
        body_budget=args.body_budget,
        max_in_flight=args.max_in_flight,
        queue=args.queue,
        max_wait=args.queue_wait,
        drain_seconds=args.drain_seconds,
        access_log=args.access_log,
        kafka_via=f"127.0.0.1:{service.kafka_port}" if service.kafka_port else kafka,
        kv_prefix=resolve(args.kv_prefix, "MLLAMBDA_KV_PREFIX", DEFAULT_KV_PREFIX),
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        payload_log_dir=str(args.payload_log_dir or folder / "payloads"),
        profile_percent=args.profile_percent,
        payload_log_max_bytes=args.payload_log_max_mb * 1024 * 1024,
    )
    async with identity_and_sidecar(args, service, folder, client, args.envoy_concurrency) as (service, sidecar):
        if package is None:
            await serve(options, service, client, sidecar)
        else:
            await serve_in_env(package, options, service, c, sidecar)


@contextlib.asynccontextmanager
async def identity_and_sidecar(
    args: argparse.Namespace, service: RuntimeService, folder: Path, client: consul.aio.Consul, concurrency: int = 1
) -> AsyncIterator[tuple[RuntimeService, ManagedProcess | None]]:
    """The model's certificate (under mTLS, kept fresh) and its Envoy sidecar while the block runs.

    Afterwards both go, and the certificate folder with them: it holds the private key.
    """
    no_sidecar = getattr(args, "no_sidecar", False)
    keeper = None
    if args.security == "mtls" and no_sidecar:  # the sidecar's own launcher keeps its certificate there
        service = replace(service, tls_dir=args.sidecar_tls_dir)
    elif args.security == "mtls":
        tls_dir = folder / f"{service.service_id}-tls"
        keeper = CertKeeper(client, service.model, lambda fresh: write_sds(tls_dir, fresh))
        await keeper.start()
        service = replace(service, tls_dir=str(tls_dir))
    sidecar = None
    try:
        sidecar = None if no_sidecar else start_sidecar(service, args.xds, folder, concurrency)
        yield service, sidecar
    finally:
        if sidecar is not None:
            sidecar.stop()
        if keeper is not None:
            await keeper.stop()
            shutil.rmtree(service.tls_dir, ignore_errors=True)


def cmd_runtime(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    checked_service_id(args)  # before any model code is imported
    if bool(args.target) == bool(args.package):
        raise CliError("give either MODULE:CALLABLE or --package (the model package --model:--version)")
    advertised(args)
    if args.no_sidecar and args.security == "mtls" and not args.sidecar_tls_dir:
        raise CliError(
            "--no-sidecar with --security mtls needs --sidecar-tls-dir: the folder where the sidecar's launcher "
            "(`mllambda sidecar --security mtls --identity MODEL`) keeps its certificates, <config-dir>/<node-id>-tls"
        )
    check_limits(args)
    # Model code runs in this process: it gets no admin token, and no Consul token through the
    # environment (the Consul client keeps its own copy; give runtimes a service-scoped token).
    os.environ.pop("MLLAMBDA_TOKEN", None)
    args.consul_token = os.environ.pop("CONSUL_HTTP_TOKEN", None)
    try:
        asyncio.run(launch(args))
    except ServeError as err:
        raise CliError(str(err)) from err
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("runtime", help="serve a predict() callable as a discoverable runtime")
    parser.add_argument(
        "target", nargs="?", help="MODULE:CALLABLE, predict(payload: dict) -> dict (sync or async); or --package"
    )
    parser.add_argument(
        "--package",
        action="store_true",
        help="run the model package --model:--version from the model store, in its own environment",
    )
    add_package_flags(parser)
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--loader", help="MODULE:CALLABLE run once before the runtime turns ready")
    parser.add_argument("--port", type=int, help="runtime TCP port (default: a free one)")
    parser.add_argument("--uds", help="runtime Unix socket path (default: under $MLLAMBDA_RUN_DIR)")
    parser.add_argument("--service-id", help="Consul service id (and Envoy node id)")
    parser.add_argument("--consul", help="Consul HTTP address (default: CONSUL_HTTP_ADDR or 127.0.0.1:8500)")
    parser.add_argument("--xds", default=DEFAULT_XDS_ADDR, help="control plane xDS HOST:PORT[,...]")
    parser.add_argument("--no-sidecar", action="store_true", help="the sidecar is run by someone else")
    parser.add_argument("--sidecar-tls-dir", help="with --no-sidecar and mtls: that sidecar's certificate folder")
    parser.add_argument("--ingress-port", type=int)
    parser.add_argument("--egress-port", type=int)
    parser.add_argument("--envoy-admin-port", type=int)
    parser.add_argument(
        "--max-body",
        type=int,
        default=MAX_BODY_CEILING,
        help="request size limit in bytes (64 MiB; a pipeline's max_body, told with each request, lowers it)",
    )
    parser.add_argument(
        "--body-budget",
        type=int,
        default=BODY_BUDGET,
        help="bytes of request bodies the runtime holds at once (128 MiB): a request whose body would go past it"
        " waits unread, its sender holding it; one larger than the budget is read alone",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        help="open connections to the runtime; one more closes an idle one, or is reset if all are busy",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=0,
        help="HTTP requests in predict at once; one more waits for a place (--queue) or is refused at once, by"
        " priority and fair share per caller (0: no limit)",
    )
    parser.add_argument(
        "--queue",
        type=int,
        default=0,
        help="requests that may wait for a place in predict beyond --max-in-flight (0: none wait)",
    )
    parser.add_argument(
        "--queue-wait",
        type=float,
        default=MAX_WAIT,
        help="seconds a request may wait for a place in predict, then a retriable 503 (its route timeout ends it too)",
    )
    parser.add_argument(
        "--inline",
        choices=["auto", "always", "never"],
        default="auto",
        help="run a sync predict on the event loop instead of a worker thread: "
        "auto (default) does so while predicts take under 1 ms",
    )
    parser.add_argument(
        "--envoy-concurrency",
        type=int,
        default=1,
        help="sidecar worker threads (default 1: it fronts one runtime; measured in docs/benchmarks.md)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=0,
        help="adaptive batching: TARGET is predict_batch(list[dict]) -> list[dict], called with up to this many "
        "concurrent requests at once (default 0: no batching, TARGET is predict(dict) -> dict)",
    )
    parser.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="with --max-batch: longest a request waits for others (5)"
    )
    parser.add_argument(
        "--payload-log-dir",
        help="where this runtime writes sampled payload records of pipelines it is the first stage of "
        "(user data; default: payloads/ in its private run folder)",
    )
    parser.add_argument("--payload-log-max-mb", type=int, default=64, help="per pipeline file, before rotating (64)")
    parser.add_argument(
        "--profile-percent",
        type=float,
        default=5.0,
        help="share of requests whose fields are profiled for model monitoring (default 5; 0: off)",
    )
    parser.add_argument("--kafka-bootstrap", help="Kafka broker for Kafka-mode pipelines (MLLAMBDA_KAFKA_BOOTSTRAP)")
    parser.add_argument("--kv-prefix", help="pipeline KV prefix of the control plane (MLLAMBDA_KV_PREFIX)")
    parser.add_argument("--drain-seconds", type=float, default=2.0, help="wait after deregistering")
    parser.add_argument("--access-log", action="store_true", help="log every request (Envoy's stats count them anyway)")
    add_advertise_flag(parser)
    add_security_flag(parser, "the sidecar gets this model's Connect certificate, kept fresh")
    parser.set_defaults(handler=cmd_runtime)
