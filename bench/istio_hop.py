"""Per-hop added latency measured the way Istio publishes it: open loop at 1,000 requests/s over
16 connections with a 1 KB body (bench/openloop.py: evenly spaced, not hey's bursts), p50/p90/p99,
two sidecars in the path.

The backend is an Envoy answering a fixed 1 KB body (a C++ echo, as Istio uses fortio's Go one), so the
figure is the two sidecars' cost, not a Python stage's. Paths, in turns within each run:
  direct                 load -> backend
  two sidecars           load -> egress Envoy -> ingress Envoy -> backend (plaintext, our listener/cluster builders)
  two sidecars, mTLS     the same with mutual TLS between the two (ECDSA P-256 leaves, as Consul Connect issues)
  ..., HTTP/2 between    plaintext, the egress Envoy speaking HTTP/2 to the ingress one (a candidate, measured)
  ..., Unix socket       plaintext, egress to ingress over a Unix socket, as two co-located sidecars could
  one sidecar, same host load -> egress Envoy -> backend at a Unix socket: a hop on one host, which skips the
                         receiver's sidecar (docs/architecture.md, "Same host")
  two bare Envoys        plaintext, two Envoys with the least config that proxies (a listener with only the
                         router filter, a static cluster, Envoy's defaults otherwise): the control that says
                         how much of the hop is our configuration and how much the machine
Each Envoy runs one worker thread, as our sidecars do.
Run: .venv/bin/python -m bench.istio_hop [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from bench.common import median
from bench.openloop import open_loop, percentiles_ms
from controlplane.node import processes
from controlplane.node.tools import find_envoy
from controlplane.translate import resources as r

BODY = json.dumps({"text": " ".join(["word"] * 200)})  # ~1 KB each way
TLS = "envoy.extensions.transport_sockets.tls.v3"
HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
PATHS = (
    "direct",
    "two sidecars",
    "two sidecars, mTLS",
    "two sidecars, HTTP/2 between",
    "two sidecars, Unix socket between",
    "one sidecar, same host",
    "two bare Envoys",
)
SAME_HOST, BARE = PATHS[-2], PATHS[-1]
H2 = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}


def certificates(folder: Path) -> dict[str, Path]:
    """A CA and one leaf per side, made with openssl."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
    run("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=bench-ca", "-days", "2", "-out", "ca.pem")
    for side in ("client", "server"):
        run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{side}.key")
        run("req", "-new", "-key", f"{side}.key", "-subj", f"/CN={side}", "-out", f"{side}.csr")
        run(
            "x509",
            "-req",
            "-in",
            f"{side}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{side}.pem",
        )
    return {name: folder / name for name in ("ca.pem", "client.pem", "client.key", "server.pem", "server.key")}


def _context(certs: dict[str, Path], side: str) -> dict[str, Any]:
    return {
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(certs[f"{side}.pem"])},
                "private_key": {"filename": str(certs[f"{side}.key"])},
            }
        ],
        "validation_context": {"trusted_ca": {"filename": str(certs["ca.pem"])}},
    }


def envoy_config(
    name: str, listen: int, upstream: int | None, certs: dict[str, Path] | None, role: str, h2: bool = False
) -> Any:
    """One listener, built by our listener builder; `upstream` None: answer the 1 KB body itself."""
    listener = json_format.MessageToDict(
        r.http_listener(name, r.tcp_address("127.0.0.1", listen), name), preserving_proto_field_name=True
    )
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    del hcm["rds"]
    if upstream is None:
        action = {"direct_response": {"status": 200, "body": {"inline_string": BODY}}}
        hcm["route_config"] = {
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, **action}]}]
        }
        # Read the whole request before answering: a reply sent before the body is read closes the connection.
        buffer = {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": 65536,
        }
        hcm["http_filters"].insert(0, {"name": "envoy.filters.http.buffer", "typed_config": buffer})
        clusters = []
    else:
        route = r.route_config(name, [r.weighted_route("/", [("next", 1)])])
        hcm["route_config"] = json_format.MessageToDict(route, preserving_proto_field_name=True)
        cluster = json_format.MessageToDict(
            r.static_cluster("next", r.tcp_address("127.0.0.1", upstream)), preserving_proto_field_name=True
        )
        if certs is not None and role == "egress":
            tls = {
                "@type": f"type.googleapis.com/{TLS}.UpstreamTlsContext",
                "common_tls_context": _context(certs, "client"),
            }
            cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
        if h2 and role == "egress":
            cluster["typed_extension_protocol_options"] = H2
        clusters = [cluster]
    if certs is not None and role == "ingress":
        server: dict[str, Any] = {
            "@type": f"type.googleapis.com/{TLS}.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": _context(certs, "server"),
        }
        listener["filter_chains"][0]["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": server,
        }
    admin = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": processes.free_port()}}}
    return {"admin": admin, "static_resources": {"listeners": [listener], "clusters": clusters}}


def bare_config(listen: int, upstream: int) -> Any:
    """The least config that proxies HTTP: not built by our builders (no buffer or request limits, retries,
    timeouts, access log or header rules), so the hop it adds is Envoy's own on this machine."""
    address = {"socket_address": {"address": "127.0.0.1", "port_value": listen}}
    router = {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    hcm = {
        "@type": f"type.googleapis.com/{HCM}",
        "stat_prefix": "bare",
        "route_config": {
            "virtual_hosts": [
                {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "next"}}]}
            ]
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": router}],
    }
    chain = {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
    upstream_address = {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}
    cluster = {
        "name": "next",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": "next",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": upstream_address}}]}],
        },
    }
    admin = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": processes.free_port()}}}
    listener = {"name": "bare", "address": address, "filter_chains": [chain]}
    return {"admin": admin, "static_resources": {"listeners": [listener], "clusters": [cluster]}}


def load(url: str, body: str) -> dict[str, float]:
    """1,000 requests/s for 10 s over 16 connections, evenly spaced (bench/openloop.py)."""
    started = time.perf_counter()
    out = asyncio.run(open_loop(url, body.encode(), rate=1000, connections=16, seconds=10))
    found = percentiles_ms(out)
    found["rps"] = len(out.latencies) / (time.perf_counter() - started)
    found["errors"] = float(sum(n for code, n in out.statuses.items() if code != 200))
    found["late"] = float(out.late)
    return found


def cpu_seconds(pids: list[int]) -> float:
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def over_pipe(config: Any, socket: Path, side: str) -> Any:
    """The ingress listening on, or the egress's cluster sending to, a Unix socket instead of TCP."""
    pipe = {"pipe": {"path": str(socket)}}
    if side == "ingress":
        config["static_resources"]["listeners"][0]["address"] = pipe
    else:
        endpoint = config["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        endpoint["endpoint"]["address"] = pipe
    return config


def start(folder: Path, name: str, config: Any, port: int, socket: Path | None = None) -> processes.ManagedProcess:
    envoy = find_envoy()
    assert envoy, "run ./dev bootstrap first"
    (folder / f"{name}.json").write_text(json.dumps(config))
    argv = processes.envoy_argv(envoy, folder / f"{name}.json", 1)
    proc = processes.ManagedProcess(name, argv, folder / f"{name}.log").start()
    proc.wait_ready(socket.exists if socket else processes.tcp_ready(port))
    return proc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="mll-bench-istio-"))
    certs = certificates(folder)
    backend = processes.free_port()
    ports = {p: (processes.free_port(), processes.free_port()) for p in PATHS[1:]}  # (egress, ingress)
    procs = [start(folder, "backend", envoy_config("backend", backend, None, None, ""), backend)]
    sidecars: dict[str, list[int]] = {"direct": [procs[0].pid]}  # direct: the backend's own CPU
    try:
        for path, (egress, ingress) in ports.items():
            if path == SAME_HOST:  # the receiver (a second backend) at a socket, reached by the sender's Envoy
                at = folder / "backend.sock"
                receiver = over_pipe(envoy_config("backend-uds", ingress, None, None, ""), at, "ingress")
                procs.append(start(folder, "backend-uds", receiver, ingress, at))
                sender = over_pipe(envoy_config("egress", egress, ingress, None, "egress"), at, "egress")
                procs.append(start(folder, "egress-same-host", sender, egress))
                sidecars[path] = [procs[-1].pid]
                continue
            if path == BARE:
                procs.append(start(folder, "ingress-bare", bare_config(ingress, backend), ingress))
                procs.append(start(folder, "egress-bare", bare_config(egress, ingress), egress))
                sidecars[path] = [procs[-2].pid, procs[-1].pid]
                continue
            tls, h2 = (certs if "mTLS" in path else None), "HTTP/2" in path
            socket = folder / "ingress.sock" if "Unix" in path else None
            tag = "tls" if tls else "h2" if h2 else "uds" if socket else "plain"
            inner = envoy_config("ingress", ingress, backend, tls, "ingress")
            inner = over_pipe(inner, socket, "ingress") if socket else inner
            procs.append(start(folder, f"ingress-{tag}", inner, ingress, socket))
            outer = envoy_config("egress", egress, ingress, tls, "egress", h2)
            outer = over_pipe(outer, socket, "egress") if socket else outer
            procs.append(start(folder, f"egress-{tag}", outer, egress))
            sidecars[path] = [procs[-2].pid, procs[-1].pid]
        urls = {PATHS[0]: f"http://127.0.0.1:{backend}/"}
        urls.update({p: f"http://127.0.0.1:{e}/" for p, (e, _) in ports.items()})
        rows: dict[str, list[dict[str, float]]] = {p: [] for p in PATHS}
        for _ in range(args.runs):
            for path, url in urls.items():
                before = cpu_seconds(sidecars.get(path, []))
                rows[path].append(load(url, BODY))
                spent = cpu_seconds(sidecars.get(path, [])) - before
                rows[path][-1]["cpu_us"] = spent / (rows[path][-1]["rps"] * 10) * 1e6  # 10 s of load
    finally:
        for proc in procs:
            proc.stop()
    keys = ("p50", "p90", "p99", "rps", "cpu_us")
    mid = {p: {k: median([x[k] for x in v]) for k in keys} for p, v in rows.items()}
    print(f"\nopen loop, 1,000 req/s, 16 connections, 1 KB, median of {args.runs} runs of 10 s (ms)")
    print("| path | p50 | p90 | p99 | req/s | CPU us per request: sidecars (direct: the backend) | non-2xx |")
    print("|---|---|---|---|---|---|---|")
    for path, m in mid.items():
        errors = sum(x["errors"] for x in rows[path])
        cpu = f"{m['cpu_us']:.0f}" if path in sidecars else "-"
        print(f"| {path} | {m['p50']:.3f} | {m['p90']:.3f} | {m['p99']:.3f} | {m['rps']:.0f} | {cpu} | {errors:.0f} |")
    for path in PATHS[1:]:
        added = {k: mid[path][k] - mid["direct"][k] for k in ("p50", "p90", "p99")}
        print(f"| added by {path} | {added['p50']:.3f} | {added['p90']:.3f} | {added['p99']:.3f} | | | |")
    print("(Istio 1.20, two sidecars with mTLS: p90 0.228, p99 0.298)")
    print(f"logs in {folder}")


if __name__ == "__main__":
    main()
