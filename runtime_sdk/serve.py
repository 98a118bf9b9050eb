"""Serve one predict() as a runtime: HTTP on TCP and a Unix socket, Consul registration,
the Kafka adapter, and a drain on stop.

Who starts the Envoy sidecar and picks the ports is the launcher's business
(`mllambda runtime`, or a pod spec); this module only needs to know whether a
sidecar is there and whether it is still alive.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
import signal
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import consul.aio

from contract.payload import MAX_BODY_CEILING
from contract.service import RuntimeService
from runtime_sdk.admission import MAX_WAIT, Admission
from runtime_sdk.app import Placement, Runtime, build_app
from runtime_sdk.batching import BatchPolicy
from runtime_sdk.egress import Egress
from runtime_sdk.health import HealthServer
from runtime_sdk.payload_log import DEFAULT_MAX_BYTES, PayloadLog
from runtime_sdk.profiles import Profiler
from runtime_sdk.registration import deregister, register, stay_registered
from runtime_sdk.wire import BODY_BUDGET, MAX_CONNECTIONS

log = logging.getLogger("mllambda.runtime")


class ServeError(RuntimeError):
    """Something the person starting the runtime has to fix (the message says what)."""


class Sidecar(Protocol):
    """The runtime's Envoy, as far as the runtime cares."""

    def alive(self) -> bool: ...

    def tail(self, lines: int = 20) -> str: ...


@dataclass(frozen=True)
class ServeOptions:
    predict: str  # MODULE:CALLABLE
    loader: str = ""  # MODULE:CALLABLE run once before turning ready
    inline: str = "auto"
    max_body: int = MAX_BODY_CEILING
    max_connections: int = MAX_CONNECTIONS
    body_budget: int = BODY_BUDGET  # bytes of request bodies held at once (runtime_sdk/wire.py)
    max_in_flight: int = 0  # HTTP requests in predict at once (0: no limit)
    queue: int = 0  # requests that may wait for a place beyond max_in_flight (runtime_sdk/admission.py)
    max_wait: float = MAX_WAIT  # seconds one may wait
    drain_seconds: float = 2.0
    access_log: bool = False
    kafka_via: str = ""  # where this runtime's Kafka clients connect (its sidecar's Kafka listener); "": no Kafka
    kv_prefix: str = ""  # the control plane's pipeline KV prefix (routing tables live beside it)
    max_batch: int = 0  # > 0: the target is predict_batch(list[dict]) -> list[dict], fed by adaptive batching
    max_wait_ms: float = 5.0
    payload_log_dir: str = ""  # where sampled payload records go ("": not kept)
    profile_percent: float = 5.0  # of requests whose fields are profiled (runtime_sdk/profiles.py; 0: off)
    payload_log_max_bytes: int = DEFAULT_MAX_BYTES


def load_callable(target: str) -> Callable[..., Any]:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ServeError(f"{target!r}: expected MODULE:CALLABLE, e.g. examples.trivial.models:tokenize")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ServeError(f"cannot import {module_name!r}: {err}") from err
    found = getattr(module, attr, None)
    if not callable(found):
        raise ServeError(f"{module_name!r} has no callable {attr!r}")
    return found


def remove_socket(path: str) -> None:
    """A stale socket of ours from a crashed run would make bind() fail; anything else is left alone."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
        raise ServeError(f"{path} exists and is not a socket of ours; remove it or choose another path")
    os.unlink(path)


async def serve(
    options: ServeOptions, service: RuntimeService, client: consul.aio.Consul, sidecar: Sidecar | None
) -> None:
    """Until SIGINT/SIGTERM (or the sidecar dies): serve, register, then deregister and drain."""
    predict = load_callable(options.predict)
    loader = load_callable(options.loader) if options.loader else None
    egress = Egress(service.egress_port, service.egress_uds)
    batch = BatchPolicy(options.max_batch, options.max_wait_ms) if options.max_batch else None
    payloads = (
        PayloadLog(Path(options.payload_log_dir), options.payload_log_max_bytes) if options.payload_log_dir else None
    )
    runtime = Runtime(
        predict,
        service.model,
        service.version,
        egress,
        placement=Placement(options.inline),
        batch=batch,
        payload_log=payloads,
        admission=Admission(options.max_in_flight, options.queue, options.max_wait) if options.max_in_flight else None,
        profiler=Profiler(options.profile_percent) if options.profile_percent > 0 else None,
    )
    access_log = logging.getLogger("mllambda.access") if options.access_log else None  # a line per request
    server = build_app(runtime, options.max_body, access_log, options.max_connections, options.body_budget)
    await runtime.start()
    remove_socket(service.runtime_uds)
    await server.listen_tcp("127.0.0.1", service.runtime_port)  # only its own sidecar calls it
    await server.listen_unix(service.runtime_uds)
    health = HealthServer(runtime, "127.0.0.1", service.health_port).start() if service.health_port else None
    log.info(
        "serving model=%s version=%s port=%d uds=%s",
        service.model,
        service.version,
        service.runtime_port,
        service.runtime_uds,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    through_sidecar = sidecar is not None
    try:
        if loader is not None:
            log.info("loading model=%s", service.model)
            await asyncio.to_thread(loader)
        if runtime.profiler is not None:  # its import ran beside the start; it is frozen with the rest below
            await asyncio.to_thread(runtime.profiler.loaded, 10.0)
        # What startup built (modules, the model) lives as long as the process: out of the collector's full
        # passes, which otherwise walk all of it again every few thousand requests (docs/benchmarks.md).
        gc.collect()
        gc.freeze()
        runtime.ready = True
        await register(client, service, through_sidecar)
        log.info("registered service_id=%s ingress_port=%d", service.service_id, service.ingress_port)
        tasks = [asyncio.create_task(stay_registered(client, service, through_sidecar))]
        if options.kafka_via:  # the Kafka client is imported only by a runtime that has a broker
            from runtime_sdk.kafka_adapter import KafkaAdapter

            tasks.append(asyncio.create_task(KafkaAdapter(runtime, options.kafka_via, client, options.kv_prefix).run()))
        try:
            await wait_for_stop(stop, sidecar)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        # Leave the catalog first so Envoys stop sending here, then drain what is in flight.
        try:
            await deregister(client, service.service_id)
            log.info("deregistered service_id=%s; draining %.1fs", service.service_id, options.drain_seconds)
            await asyncio.sleep(options.drain_seconds)
        except Exception as err:
            log.warning("deregistration failed service_id=%s: %s", service.service_id, err)
        runtime.ready = False
        if health is not None:
            health.stop()
        await server.stop(options.drain_seconds + 10)
        await runtime.close()
        remove_socket(service.runtime_uds)


async def wait_for_stop(stop: asyncio.Event, sidecar: Sidecar | None) -> None:
    while not stop.is_set():
        if sidecar is not None and not sidecar.alive():
            raise ServeError(f"the Envoy sidecar exited:\n{sidecar.tail()}")
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except TimeoutError:
            pass
