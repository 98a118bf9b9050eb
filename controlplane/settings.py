"""The control plane's settings: one frozen record, read once from flags and the environment."""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass, field

from contract.naming import DEFAULT_KV_PREFIX
from controlplane.config import (
    DEFAULT_ADMIN_ADDR,
    DEFAULT_BRIDGE_ADDR,
    DEFAULT_XDS_ADDR,
    ConsulAddress,
    add_security_flag,
    model_store_dir,
    resolve,
    run_folder,
)
from controlplane.consul.discovery import EMPTY_GRACE
from controlplane.pipeline.store import KEEP_VERSIONS
from controlplane.xds.cache import GroupBy

# how a sender reaches a runtime on its own host (docs/architecture.md, "Same host")
COLOCATED = ("direct", "shared", "ingress")


@dataclass(frozen=True)
class Settings:
    xds_addr: str = DEFAULT_XDS_ADDR
    admin_addr: str = DEFAULT_ADMIN_ADDR
    consul: ConsulAddress = field(default_factory=ConsulAddress.from_settings)
    token: str | None = None
    ui_token: str | None = None  # signs a browser in to change pipelines from the dashboard (else the admin token)
    group_by: GroupBy = "id"
    kv_prefix: str = DEFAULT_KV_PREFIX
    gateway_host: str = "127.0.0.1"  # where gateway Envoys listen for clients (the public edge; see the threat model)
    gateway_port: int = 18080
    gateway_admin_port: int = 0  # where to read the gateway Envoy's stats (0: not read)
    metrics_addr: str | None = None  # host:port for /metrics, /api/status and the dashboard
    kafka_bootstrap: str | None = None  # enables transport: kafka
    bridge_addr: str = DEFAULT_BRIDGE_ADDR  # the Kafka HTTP bridge (only with kafka_bootstrap)
    oip_grpc_addr: str = ""  # the OIP gRPC front (controlplane/edge); "": none, gateways answer gRPC with 404
    empty_grace: float = EMPTY_GRACE  # seconds every runtime may vanish at once before it is believed
    security: str = "plaintext"  # "mtls": every hop, xDS and the bridge mutually authenticated (Connect CA)
    gateway_tls_dir: str = ""  # with mtls: the gateway Envoy's certificate folder (its launcher keeps it)
    admin_tls: tuple[str, str, str] = ("", "", "")  # cert, key, client CA (PEM files) for the admin API
    exposed: bool = False  # serve admin/xDS beyond loopback without authentication (--insecure-expose)
    keep_versions: int = KEEP_VERSIONS  # per pipeline in Consul KV: each new version drops the one this far back
    autoscale_file: str = ""  # `kind: Autoscale` policies per model version ("": nothing is scaled)
    scaler: str = "local"  # who carries decisions out: "local" (`mllambda up`) or "kubernetes" (scale subresource)
    kubernetes_namespace: str = "default"  # with scaler kubernetes: where the runtime Deployments are
    colocated: str = "shared"  # a runtime on the sender's host (COLOCATED; docs/architecture.md, "Same host")
    run_folder: str = ""  # with shared: the folder whose runtimes' egress sockets the gateway takes
    model_store: str = ""  # where model packages are kept by digest ("": config.model_store_dir())
    packages_addr: str = ""  # serves packages to hosts that lack them (mTLS beyond loopback); "": not served


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        xds_addr=args.xds,
        admin_addr=resolve(args.admin, "MLLAMBDA_ADMIN_ADDR", DEFAULT_ADMIN_ADDR),
        consul=ConsulAddress.from_settings(args.consul),
        token=os.environ.get("MLLAMBDA_TOKEN") or None,
        ui_token=os.environ.get("MLLAMBDA_UI_TOKEN") or None,
        group_by=args.group_by,
        kv_prefix=resolve(args.kv_prefix, "MLLAMBDA_KV_PREFIX", DEFAULT_KV_PREFIX),
        gateway_host=args.gateway_host,
        gateway_port=args.gateway_port,
        gateway_admin_port=args.gateway_admin_port,
        metrics_addr=resolve(args.metrics_addr, "MLLAMBDA_METRICS_ADDR", "")
        or (f"127.0.0.1:{args.metrics_port}" if args.metrics_port else None),
        kafka_bootstrap=resolve(args.kafka_bootstrap, "MLLAMBDA_KAFKA_BOOTSTRAP", "") or None,
        bridge_addr=resolve(args.bridge, "MLLAMBDA_BRIDGE_ADDR", DEFAULT_BRIDGE_ADDR),
        oip_grpc_addr=resolve(args.oip_grpc, "MLLAMBDA_OIP_GRPC_ADDR", ""),
        empty_grace=args.empty_grace,
        security=args.security,
        gateway_tls_dir=args.gateway_tls_dir or "",
        admin_tls=(args.admin_tls_cert or "", args.admin_tls_key or "", args.admin_tls_client_ca or ""),
        exposed=args.insecure_expose,
        keep_versions=args.keep_versions,
        autoscale_file=resolve(args.autoscale, "MLLAMBDA_AUTOSCALE", ""),
        scaler=args.scaler,
        kubernetes_namespace=args.kubernetes_namespace,
        colocated=_colocated(resolve(args.colocated, "MLLAMBDA_COLOCATED", "shared")),
        run_folder=str(run_folder()),
        model_store=str(model_store_dir(args.model_store)),
        packages_addr=resolve(args.packages, "MLLAMBDA_PACKAGES_ADDR", ""),
    )


def gateway_ip(text: str) -> str:
    """An IP (0.0.0.0 for every address of a pod); the gateway answers clients without authenticating them."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an IP address, got {text[:60]!r}") from None


def _colocated(text: str) -> str:
    if text not in COLOCATED:
        raise ValueError(f"MLLAMBDA_COLOCATED: expected one of {', '.join(COLOCATED)}, got {text[:40]!r}")
    return text


def _at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("keep at least 2 versions (the current one and one to roll back to)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--xds", default=DEFAULT_XDS_ADDR, help="xDS (ADS) listen address")
    parser.add_argument("--admin", help=f"admin API listen address (default {DEFAULT_ADMIN_ADDR})")
    parser.add_argument("--consul", help="Consul HTTP address (default: CONSUL_HTTP_ADDR or 127.0.0.1:8500)")
    parser.add_argument(
        "--group-by", choices=["id", "cluster"], default="id", help="share snapshots by node id or cluster"
    )
    parser.add_argument("--kv-prefix", help=f"Consul KV prefix for pipelines (default {DEFAULT_KV_PREFIX})")
    parser.add_argument(
        "--model-store", help="folder of model packages by digest (MLLAMBDA_MODEL_STORE; .mllambda/models)"
    )
    parser.add_argument(
        "--packages",
        help="HOST:PORT where runtime hosts that lack a model package fetch it (MLLAMBDA_PACKAGES_ADDR; default: "
        "not served, hosts share the store folder)",
    )
    parser.add_argument(
        "--gateway-host", default="127.0.0.1", type=gateway_ip, help="IP the gateway Envoys' listener binds (127.0.0.1)"
    )
    parser.add_argument("--gateway-port", type=int, default=18080, help="port of the gateway Envoy's listener")
    parser.add_argument("--gateway-admin-port", type=int, default=0, help="gateway Envoy admin port (for its stats)")
    parser.add_argument("--kafka-bootstrap", help="Kafka broker for transport: kafka (MLLAMBDA_KAFKA_BOOTSTRAP)")
    parser.add_argument(
        "--oip-grpc",
        help="listen address of the Open Inference Protocol over gRPC, which gateways route to on their own "
        "listener (MLLAMBDA_OIP_GRPC_ADDR; loopback unless --insecure-expose; none by default)",
    )
    parser.add_argument(
        "--bridge",
        help=f"Kafka HTTP bridge listen address, with a broker (MLLAMBDA_BRIDGE_ADDR, {DEFAULT_BRIDGE_ADDR})",
    )
    parser.add_argument(
        "--empty-grace",
        type=float,
        default=EMPTY_GRACE,
        help=f"seconds to hold the last runtimes when every one vanishes at once (default {EMPTY_GRACE:g}; 0: never)",
    )
    parser.add_argument("--metrics-port", type=int, help="serve /metrics, /api/status and the dashboard here")
    parser.add_argument(
        "--metrics-addr", help="the same on IP:PORT (beyond loopback only with --insecure-expose; registered in Consul)"
    )
    parser.add_argument(
        "--keep-versions",
        type=_at_least_two,
        default=KEEP_VERSIONS,
        help=f"versions kept per pipeline (history, rollback); each new one drops the oldest (default {KEEP_VERSIONS})",
    )
    parser.add_argument("--autoscale", help="autoscaling policies (kind: Autoscale YAML; MLLAMBDA_AUTOSCALE)")
    parser.add_argument(
        "--scaler",
        choices=["local", "kubernetes"],
        default="local",
        help="who carries scaling out: local (`mllambda up` reads the decisions) or kubernetes (Deployment scale)",
    )
    parser.add_argument("--kubernetes-namespace", default="default", help="with --scaler kubernetes: the namespace")
    parser.add_argument(
        "--colocated",
        choices=COLOCATED,
        help="a runtime on the sender's own host: shared (reached at its socket, and on the gateway's host its "
        "output goes through the gateway Envoy too; the default), direct (at its socket, its output through "
        "its own sidecar) or ingress (through its sidecar, as from another host) (MLLAMBDA_COLOCATED)",
    )
    add_security_flag(parser, "every hop, xDS and the Kafka bridge mutually authenticated (Consul Connect)")
    parser.add_argument("--gateway-tls-dir", help="with mtls: the gateway Envoy's certificate folder")
    parser.add_argument("--admin-tls-cert", help="admin API over TLS: certificate chain (PEM)")
    parser.add_argument("--admin-tls-key", help="admin API over TLS: private key (PEM)")
    parser.add_argument("--admin-tls-client-ca", help="admin API: require client certificates signed by this CA")
    parser.add_argument(
        "--insecure-expose",
        action="store_true",
        help="allow admin/xDS beyond loopback without TLS and a token (only on a network that is yours alone)",
    )
