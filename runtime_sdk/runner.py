"""`mllambda runtime MODULE:CALLABLE --model M --version V`: serve, register, sidecar, drain."""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import logging
import os
import signal
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import consul.aio
from aiohttp import web

from controlplane.config import DEFAULT_XDS_ADDR, ConsulAddress
from controlplane.errors import CliError
from controlplane.processes import ManagedProcess, envoy_argv, free_port
from controlplane.sidecar import write_bootstrap
from controlplane.store import DEFAULT_PREFIX
from controlplane.tools import find_envoy
from runtime_sdk.app import DEFAULT_MAX_BODY, Egress, Placement, Runtime, build_app
from runtime_sdk.kafka import KafkaAdapter
from runtime_sdk.registration import Registration, deregister, keep_registered, register

log = logging.getLogger("mllambda.runtime")


def load_callable(target: str) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise CliError(f"{target!r}: expected MODULE:CALLABLE, e.g. examples.trivial.models:tokenize")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CliError(f"cannot import {module_name!r}: {err}") from err
    found = getattr(module, attr, None)
    if not callable(found):
        raise CliError(f"{module_name!r} has no callable {attr!r}")
    return found


def run_dir() -> Path:
    folder = Path(os.environ.get("MLLAMBDA_RUN_DIR") or Path(tempfile.gettempdir()) / f"mllambda-{os.getuid()}")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


async def run(args: argparse.Namespace) -> None:
    predict = load_callable(args.target)
    loader = load_callable(args.loader) if args.loader else None
    kafka = os.environ.get("MLLAMBDA_KAFKA_BOOTSTRAP") if args.kafka_bootstrap is None else args.kafka_bootstrap
    service_id = args.service_id or f"{args.model}-{args.version}-{socket.gethostname()}-{os.getpid()}"
    folder = run_dir()
    reg = Registration(
        service_id=service_id,
        model=args.model,
        version=args.version,
        host="127.0.0.1",
        runtime_port=args.port or free_port(),
        runtime_uds=str(args.uds or folder / f"{service_id}.sock"),
        ingress_port=args.ingress_port or free_port(),
        egress_port=args.egress_port or free_port(),
        egress_uds=str(folder / f"{service_id}-egress.sock"),
        envoy_admin_port=args.envoy_admin_port or free_port(),
        # Broker traffic goes through the sidecar when there is one.
        kafka_port=free_port() if kafka and not args.no_sidecar else 0,
    )
    egress = Egress(reg.egress_port, reg.egress_uds)
    runtime = Runtime(predict, args.model, args.version, egress, placement=Placement(args.inline))
    access_log = logging.getLogger("aiohttp.access") if args.access_log else None  # a line per request costs ~10% CPU
    runner = web.AppRunner(
        build_app(runtime, args.max_body), shutdown_timeout=args.drain_seconds + 10, access_log=access_log
    )
    await runner.setup()
    remove_socket(reg.runtime_uds)
    await web.TCPSite(runner, reg.host, reg.runtime_port).start()
    await web.UnixSite(runner, reg.runtime_uds).start()
    log.info(
        "serving model=%s version=%s port=%d uds=%s",
        reg.model,
        reg.version,
        reg.runtime_port,
        reg.runtime_uds,
    )

    sidecar = None
    if not args.no_sidecar:
        sidecar = start_sidecar(reg, args.xds, folder, args.envoy_concurrency)
    c = ConsulAddress.from_settings(args.consul)
    client = consul.aio.Consul(host=c.host, port=c.port, scheme=c.scheme, token=c.token)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if loader is not None:
            log.info("loading model=%s", reg.model)
            await asyncio.to_thread(loader)
        runtime.ready = True
        await register(client, reg, through_sidecar=sidecar is not None)
        log.info("registered service_id=%s ingress_port=%d", service_id, reg.ingress_port)
        again = functools.partial(register, client, reg, sidecar is not None, passing=True)
        keeper = asyncio.create_task(keep_registered(client, reg.service_id, again))
        adapter = None
        if kafka:
            kv_prefix = args.kv_prefix or os.environ.get("MLLAMBDA_KV_PREFIX") or DEFAULT_PREFIX
            via = f"127.0.0.1:{reg.kafka_port}" if reg.kafka_port else kafka
            adapter = asyncio.create_task(KafkaAdapter(runtime, via, client, kv_prefix).run())
        try:
            await wait_for_stop(stop, sidecar)
        finally:
            keeper.cancel()
            if adapter is not None:
                adapter.cancel()
                await asyncio.gather(adapter, return_exceptions=True)
    finally:
        # Leave the catalog first so Envoys stop sending here, then drain what is in flight.
        try:
            await deregister(client, service_id)
            log.info("deregistered service_id=%s; draining %.1fs", service_id, args.drain_seconds)
            await asyncio.sleep(args.drain_seconds)
        except Exception as err:
            log.warning("deregistration failed service_id=%s: %s", service_id, err)
        runtime.ready = False
        await runner.cleanup()
        if sidecar is not None:
            sidecar.stop()
        await client.close()
        remove_socket(reg.runtime_uds)


async def wait_for_stop(stop: asyncio.Event, sidecar: ManagedProcess | None) -> None:
    while not stop.is_set():
        if sidecar is not None and not sidecar.alive():
            raise CliError(f"the Envoy sidecar exited:\n{sidecar.tail()}")
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except TimeoutError:
            pass


def start_sidecar(reg: Registration, xds_addr: str, folder: Path, concurrency: int | None) -> ManagedProcess:
    envoy = find_envoy()
    if envoy is None:
        raise CliError("envoy not found: run ./dev bootstrap, or pass --no-sidecar")
    config = write_bootstrap(
        folder / f"{reg.service_id}-envoy.yaml",
        node_id=reg.service_id,
        cluster=f"{reg.model}.{reg.version}",
        xds_addr=xds_addr,
        admin_port=reg.envoy_admin_port,
    )
    remove_socket(reg.egress_uds)
    log_path = folder / f"{reg.service_id}-envoy.log"
    argv = envoy_argv(envoy, config, concurrency)
    return ManagedProcess("sidecar", argv, log_path, die_with_parent=True).start()


def remove_socket(path: str) -> None:
    """A stale socket file from a crashed run would make bind() fail."""
    Path(path).unlink(missing_ok=True)


def cmd_runtime(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(run(args))
    return 0


def register_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("runtime", help="serve a predict() callable as a discoverable runtime")
    parser.add_argument("target", help="MODULE:CALLABLE, predict(payload: dict) -> dict (sync or async)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--loader", help="MODULE:CALLABLE run once before the runtime turns ready")
    parser.add_argument("--port", type=int, help="runtime TCP port (default: a free one)")
    parser.add_argument("--uds", help="runtime Unix socket path (default: under $MLLAMBDA_RUN_DIR)")
    parser.add_argument("--service-id", help="Consul service id (and Envoy node id)")
    parser.add_argument("--consul", help="Consul HTTP address (default: CONSUL_HTTP_ADDR or 127.0.0.1:8500)")
    parser.add_argument("--xds", default=DEFAULT_XDS_ADDR, help="control plane xDS HOST:PORT[,...]")
    parser.add_argument("--no-sidecar", action="store_true", help="the sidecar is run by someone else")
    parser.add_argument("--ingress-port", type=int)
    parser.add_argument("--egress-port", type=int)
    parser.add_argument("--envoy-admin-port", type=int)
    parser.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY, help="request size limit in bytes")
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
    parser.add_argument("--kafka-bootstrap", help="Kafka broker for Kafka-mode pipelines (MLLAMBDA_KAFKA_BOOTSTRAP)")
    parser.add_argument("--kv-prefix", help="pipeline KV prefix of the control plane (MLLAMBDA_KV_PREFIX)")
    parser.add_argument("--drain-seconds", type=float, default=2.0, help="wait after deregistering")
    parser.add_argument("--access-log", action="store_true", help="log every request (Envoy's stats count them anyway)")
    parser.set_defaults(handler=cmd_runtime)
