"""Envoy bootstrap for sidecars and gateways, rendered from envoy/sidecar.yaml."""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path
from string import Template

from controlplane.config import DEFAULT_XDS_ADDR, PROJECT_ROOT, split_host_port
from controlplane.errors import CliError
from controlplane.processes import envoy_argv
from controlplane.tools import find_envoy

TEMPLATE = PROJECT_ROOT / "envoy" / "sidecar.yaml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def render_bootstrap(node_id: str, cluster: str, xds_addr: str, admin_port: int, delta: bool = False) -> str:
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
        api_type="DELTA_GRPC" if delta else "GRPC",
    )


def write_bootstrap(path: Path, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_bootstrap(**kwargs))  # type: ignore[arg-type]
    return path


def cmd_sidecar(args: argparse.Namespace) -> int:
    envoy = find_envoy()
    if envoy is None:
        raise CliError("envoy not found: run ./dev bootstrap")
    try:
        text = render_bootstrap(args.node_id, args.cluster, args.xds, args.admin_port, args.delta)
    except ValueError as err:
        raise CliError(str(err)) from err
    folder = Path(args.config_dir or tempfile.mkdtemp(prefix="mllambda-envoy-"))
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{args.node_id}.yaml"
    config.write_text(text)
    argv = envoy_argv(envoy, config, args.concurrency)
    os.execv(argv[0], argv)
    return 0  # not reached


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("sidecar", help="run an Envoy fed by the control plane")
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--cluster", required=True, help="Envoy service cluster (node group)")
    parser.add_argument("--xds", default=DEFAULT_XDS_ADDR, help="control plane xDS address(es): HOST:PORT[,HOST:PORT]")
    parser.add_argument("--admin-port", type=int, default=19000)
    parser.add_argument("--delta", action="store_true", help="incremental xDS instead of SotW")
    parser.add_argument("--config-dir", help="where to write the bootstrap (default: a temp dir)")
    parser.add_argument("--concurrency", type=int, help="Envoy worker threads (default: one per core)")
    parser.set_defaults(handler=cmd_sidecar)
