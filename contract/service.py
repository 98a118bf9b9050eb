"""A runtime's entry in Consul's catalog: the one schema of its service meta.

The runtime SDK writes it (`to_meta`), the control plane reads it back from a
health entry (`from_entry`). A registration that does not fit the schema is
refused with the reason, so one bad entry cannot take the others down.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from contract.naming import LABEL, SERVICE_ID, SERVICE_TAG, VERSION, model_cluster, name_problem


class BadRegistration(ValueError):
    """A catalog entry that is not a usable ML Lambda runtime."""


@dataclass(frozen=True)
class RuntimeService:
    """One runtime instance and where its sidecar listens."""

    service_id: str
    model: str
    version: str
    host: str
    runtime_port: int
    runtime_uds: str
    ingress_port: int  # the sidecar listener other Envoys send to
    egress_port: int  # the sidecar listener this runtime forwards to
    egress_uds: str
    envoy_admin_port: int = 0
    kafka_port: int = 0  # the sidecar listener that proxies to the Kafka broker (0: none)
    health_port: int = 0  # the runtime's readiness listener, off its event loop (0: the runtime port answers)
    tls_dir: str = ""  # its sidecar's certificate folder (file-based SDS); "": plaintext
    oip_model: str = ""  # a server we do not run (`mllambda register`): its OIP model name; "": our runtime SDK
    passing: bool = False  # from Consul's health checks; not part of the meta

    @functools.cached_property
    def cluster(self) -> str:
        return model_cluster(self.model, self.version)

    def ingress_url(self, path: str) -> str:
        """`path` on its sidecar's mTLS ingress: how a control plane on another host reads it (/stats, /profiles)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.ingress_port}{path}"

    def tags(self) -> list[str]:
        return [SERVICE_TAG, f"version-{self.version}"]

    def to_meta(self) -> dict[str, str]:
        return {
            "model": self.model,
            "version": self.version,
            "runtime_port": str(self.runtime_port),
            "runtime_uds": self.runtime_uds,
            "ingress_port": str(self.ingress_port),
            "egress_port": str(self.egress_port),
            "egress_uds": self.egress_uds,
            "envoy_admin_port": str(self.envoy_admin_port),
            "kafka_port": str(self.kafka_port),
            "health_port": str(self.health_port),
            "tls_dir": self.tls_dir,
            "oip_model": self.oip_model,
        }

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> RuntimeService:
        """A `/v1/health/service/...` entry -> RuntimeService, or BadRegistration saying why."""
        try:
            service = entry["Service"]
            meta = service.get("Meta") or {}
            return cls(
                service_id=_named(service["ID"], "service id", SERVICE_ID),
                model=_named(_text(meta, "model"), "meta 'model'", LABEL),
                version=_named(_text(meta, "version"), "meta 'version'", VERSION),
                host=str(service.get("Address") or entry["Node"]["Address"]),
                runtime_port=_port(meta, "runtime_port"),
                runtime_uds=_socket(meta, "runtime_uds"),
                ingress_port=_port(meta, "ingress_port"),
                egress_port=_port(meta, "egress_port"),
                egress_uds=_socket(meta, "egress_uds"),
                envoy_admin_port=_port(meta, "envoy_admin_port", optional=True),
                kafka_port=_port(meta, "kafka_port", optional=True),
                health_port=_port(meta, "health_port", optional=True),
                tls_dir=_folder(meta.get("tls_dir", "")),
                oip_model=_named(meta["oip_model"], "meta 'oip_model'", SERVICE_ID) if meta.get("oip_model") else "",
                passing=all(c.get("Status") == "passing" for c in entry.get("Checks") or []),
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise BadRegistration(f"incomplete entry: missing {err}") from err


def _text(meta: Mapping[str, Any], key: str) -> str:
    value = meta.get(key)
    if not isinstance(value, str) or not value:
        raise BadRegistration(f"meta {key!r} is missing or empty")
    return value


def _folder(value: Any) -> str:
    """An absolute path Envoy reads SDS files under (it becomes part of a config path)."""
    if value in (None, ""):
        return ""
    if not isinstance(value, str) or not value.startswith("/") or len(value) > 200 or not value.isprintable():
        raise BadRegistration(f"meta 'tls_dir' is not an absolute path: {str(value)[:40]!r}")
    return value


SOCKET_PATH_BYTES = 108  # a Unix socket address's path; the kernel, Python and Envoy refuse a longer one


def socket_path_fits(path: str) -> bool:
    return path.startswith("/") and len(path.encode()) <= SOCKET_PATH_BYTES and path.isprintable()


EGRESS_SOCKET = "-egress.sock"  # how a runtime's egress socket ends (launch.py names it)


def shared_egress_socket(egress_uds: str) -> str:
    """Where the host's shared Envoy takes a runtime's output, next to its egress socket (shorter, so it fits;
    '@' is in no service id, so no runtime's own socket has this name); "": none (docs/architecture.md,
    "Same host")."""
    return egress_uds.removesuffix(EGRESS_SOCKET) + "@host.sock" if egress_uds.endswith(EGRESS_SOCKET) else ""


def _socket(meta: Mapping[str, Any], key: str) -> str:
    """An absolute Unix socket path Envoy can take: other Envoys on the host send to a runtime's socket, so a
    path Envoy refuses would fail their whole update (docs/architecture.md, "Same host")."""
    value = meta.get(key, "")
    if value in (None, ""):
        return ""
    if not isinstance(value, str) or not socket_path_fits(value):
        raise BadRegistration(
            f"meta {key!r} is not a Unix socket path (absolute, at most {SOCKET_PATH_BYTES} bytes): {str(value)[:40]!r}"
        )
    return value


def _named(value: Any, what: str, rule: re.Pattern[str]) -> str:
    problem = name_problem(value, rule)
    if problem is not None:
        raise BadRegistration(f"{what}: {problem}")
    return str(value)


def _port(meta: Mapping[str, Any], key: str, optional: bool = False) -> int:
    raw = meta.get(key)
    if optional and raw in (None, "", "0"):
        return 0
    if not isinstance(raw, str) or not raw.isdigit() or not 0 < int(raw) < 65536:
        raise BadRegistration(f"meta {key!r} is not a port number: {str(raw)[:20]!r}")
    return int(raw)


def bridge_meta(kv_prefix: str) -> dict[str, str]:
    """A Kafka bridge serves the control planes that share its pipeline KV prefix."""
    return {"kv_prefix": kv_prefix}


def bridge_address(entry: Mapping[str, Any], kv_prefix: str) -> tuple[str, int] | None:
    """A bridge's (host, port) from its health entry; None if it serves another deployment or is malformed."""
    try:
        service = entry["Service"]
        if (service.get("Meta") or {}).get("kv_prefix") != kv_prefix:
            return None
        port = int(service["Port"])
        host = str(service.get("Address") or entry["Node"]["Address"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return (host, port) if 0 < port < 65536 else None
