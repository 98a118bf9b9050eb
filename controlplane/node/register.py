"""`mllambda register`: an Open Inference Protocol server we do not run (MLServer, Triton, a KServe
runtime) as a model version in pipelines, behind its own Envoy sidecar.

It registers the server in Consul like a runtime (meta `oip_model`), starts its
sidecar, and stays until SIGTERM/SIGINT, then deregisters and stops the sidecar;
the server itself is left alone. Consul checks it through the sidecar with OIP's
own question (`/v2/models/<name>/ready`), so a server whose model is not ready
leaves EDS. It can only answer: pipelines use it in a stage with `protocol: oip`,
whose sender asks it and sends its answer on (docs/architecture.md, "Open
Inference Protocol").
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from contract.naming import SERVICE_ID, name_problem
from contract.service import RuntimeService
from controlplane.config import DEFAULT_XDS_ADDR, ConsulAddress, add_security_flag
from controlplane.consul import client as consul_client
from controlplane.errors import CliError
from controlplane.node.launch import add_advertise_flag, advertised, checked_service_id, identity_and_sidecar, run_dir
from controlplane.node.processes import free_port
from runtime_sdk.registration import deregister, register, stay_registered
from runtime_sdk.serve import ServeError, wait_for_stop

log = logging.getLogger("mllambda.register")


def plan_external(args: argparse.Namespace) -> RuntimeService:
    service_id = checked_service_id(args)
    oip_model = args.oip_model or args.model
    problem = name_problem(oip_model, SERVICE_ID)
    if problem is not None:
        raise CliError(f"--oip-model: {problem}")
    if not 0 < args.oip_port < 65536:
        raise CliError(f"--oip-port: a TCP port on this host, got {args.oip_port}")
    return RuntimeService(
        service_id=service_id,
        model=args.model,
        version=args.version,
        host=advertised(args),
        runtime_port=args.oip_port,
        runtime_uds="",
        ingress_port=args.ingress_port or free_port(),
        egress_port=free_port(),
        egress_uds="",
        envoy_admin_port=args.envoy_admin_port or free_port(),
        oip_model=oip_model,
    )


async def hold(args: argparse.Namespace, service: RuntimeService) -> None:
    c = ConsulAddress.from_settings(args.consul, getattr(args, "consul_token", None))
    client = consul_client.connect(c)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        async with identity_and_sidecar(args, service, run_dir(), client) as (service, sidecar):
            await register(client, service)
            log.info(
                "registered service_id=%s oip=127.0.0.1:%d model=%s",
                service.service_id,
                service.runtime_port,
                service.oip_model,
            )
            keep = asyncio.create_task(stay_registered(client, service, True))
            try:
                await wait_for_stop(stop, sidecar)
            finally:
                keep.cancel()
                await deregister(client, service.service_id)
                log.info("deregistered service_id=%s", service.service_id)
    finally:
        await client.close()


def cmd_register(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    service = plan_external(args)
    try:
        asyncio.run(hold(args, service))
    except ServeError as err:
        raise CliError(str(err)) from err
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "register",
        help="put an Open Inference Protocol server we do not run (MLServer, Triton) into pipelines",
        description="Registers the server in Consul behind its own Envoy sidecar until stopped. Use it in a "
        "stage with `protocol: oip`.",
    )
    parser.add_argument("--model", required=True, help="the model name pipelines use")
    parser.add_argument("--version", required=True)
    parser.add_argument("--oip-port", type=int, required=True, help="the server's HTTP port on this host")
    parser.add_argument("--oip-model", help="the model's name on the server (default: --model)")
    parser.add_argument("--service-id", help="Consul service id (and Envoy node id)")
    parser.add_argument("--consul", help="Consul HTTP address (default: CONSUL_HTTP_ADDR or 127.0.0.1:8500)")
    parser.add_argument("--xds", default=DEFAULT_XDS_ADDR, help="control plane xDS HOST:PORT[,...]")
    parser.add_argument("--ingress-port", type=int)
    add_advertise_flag(parser)
    parser.add_argument("--envoy-admin-port", type=int)
    add_security_flag(parser, "the sidecar gets this model's Connect certificate, kept fresh")
    parser.set_defaults(handler=cmd_register)
