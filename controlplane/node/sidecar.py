"""Envoy bootstrap for sidecars and gateways, rendered from envoy/sidecar.yaml."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import signal
import tempfile
from pathlib import Path
from string import Template

from contract.naming import CONTROL_PLANE_IDENTITY, GATEWAY_IDENTITY
from controlplane.config import DEFAULT_XDS_ADDR, PROJECT_ROOT, ConsulAddress, add_security_flag, split_host_port
from controlplane.consul import client as consul_client
from controlplane.consul.certs import CertKeeper, write_sds
from controlplane.errors import CliError
from controlplane.node.processes import ManagedProcess, envoy_argv
from controlplane.node.tools import find_envoy

TEMPLATE = PROJECT_ROOT / "envoy" / "sidecar.yaml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def render_bootstrap(
    node_id: str, cluster: str, xds_addr: str, admin_port: int, delta: bool = False, tls_dir: str = ""
) -> str:
    """With `tls_dir` (a certificate folder kept by certs.write_sds), xDS runs over mTLS to the control plane."""
    for label, value in (("node id", node_id), ("cluster", cluster)):
        if not _NAME.match(value):
            raise ValueError(f"bad {label} {value!r}: use letters, digits, '.', '_' or '-'")
    servers = [split_host_port(addr.strip(), default_port=18000) for addr in xds_addr.split(",") if addr.strip()]
    if not servers:
        raise ValueError("no xDS address given")
    endpoints = [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}} for host, port in servers
    ]
    return Template(TEMPLATE.read_text()).substitute(
        node_id=node_id,
        node_cluster=cluster,
        admin_port=admin_port,
        xds_endpoints=json.dumps(endpoints),  # JSON is YAML
        xds_cluster_type="STATIC" if all(_is_ip(host) for host, _ in servers) else "STRICT_DNS",
        api_type="DELTA_GRPC" if delta else "GRPC",
        xds_transport_socket=_xds_tls(tls_dir),
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _xds_tls(tls_dir: str) -> str:
    if not tls_dir:
        return "null"
    from google.protobuf import json_format  # the protos only for mTLS (a plain runtime starts without them)

    from controlplane.translate.security import upstream_tls

    socket = upstream_tls(tls_dir, CONTROL_PLANE_IDENTITY, alpn=["h2"])  # gRPC wants h2 by ALPN
    return json.dumps(json_format.MessageToDict(socket))


def write_bootstrap(path: Path, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_bootstrap(**kwargs))  # type: ignore[arg-type]
    return path


def cmd_sidecar(args: argparse.Namespace) -> int:
    envoy = find_envoy()
    if envoy is None:
        raise CliError("envoy not found: run ./dev bootstrap")
    folder = Path(args.config_dir or tempfile.mkdtemp(prefix="mllambda-envoy-"))
    tls_dir = folder / f"{args.node_id}-tls" if args.security == "mtls" else None
    try:
        text = render_bootstrap(args.node_id, args.cluster, args.xds, args.admin_port, args.delta, str(tls_dir or ""))
    except ValueError as err:
        raise CliError(str(err)) from err
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{args.node_id}.yaml"
    config.write_text(text)
    argv = envoy_argv(envoy, config, args.concurrency)
    if tls_dir is None:
        os.execv(argv[0], argv)
    envoy_process = ManagedProcess("envoy", argv, folder / f"{args.node_id}-envoy.log", die_with_parent=True)
    return asyncio.run(_keep_certified(envoy_process, args.identity, tls_dir, args.consul))


async def _keep_certified(envoy: ManagedProcess, identity: str, tls_dir: Path, consul_addr: str | None) -> int:
    """Fetch this Envoy's identity, start it, keep its certificates fresh until it exits or we must stop."""
    c = ConsulAddress.from_settings(consul_addr)
    client = consul_client.connect(c)
    keeper = CertKeeper(client, identity, lambda fresh: write_sds(tls_dir, fresh))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await keeper.start()
        envoy.start()
        while not stop.is_set() and envoy.alive():
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                pass
        if not envoy.alive():
            print(envoy.tail())
            return 1
        return 0
    finally:
        envoy.stop()
        await keeper.stop()
        await client.close()


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("sidecar", help="run an Envoy fed by the control plane")
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--cluster", required=True, help="Envoy service cluster (node group)")
    parser.add_argument("--xds", default=DEFAULT_XDS_ADDR, help="control plane xDS address(es): HOST:PORT[,HOST:PORT]")
    parser.add_argument("--admin-port", type=int, default=19000)
    parser.add_argument("--delta", action="store_true", help="incremental xDS instead of SotW")
    parser.add_argument("--config-dir", help="where to write the bootstrap (default: a temp dir)")
    parser.add_argument("--concurrency", type=int, help="Envoy worker threads (default: one per core)")
    add_security_flag(parser, "a certificate from Consul's Connect CA, kept fresh")
    parser.add_argument(
        "--identity", default=GATEWAY_IDENTITY, help="the Consul service this Envoy's certificate names"
    )
    parser.add_argument("--consul", help="Consul HTTP address, for certificates (default: CONSUL_HTTP_ADDR)")
    parser.set_defaults(handler=cmd_sidecar)
