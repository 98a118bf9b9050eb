"""Where things are: addresses and tokens, resolved as flag > environment > default.

Consul settings follow the consul CLI's own conventions (CONSUL_HTTP_ADDR,
CONSUL_HTTP_TOKEN) so an operator's existing environment just works.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CONSUL_ADDR = "127.0.0.1:8500"
DEFAULT_XDS_ADDR = "127.0.0.1:18000"
DEFAULT_ADMIN_ADDR = "127.0.0.1:18001"
DEFAULT_BRIDGE_ADDR = "127.0.0.1:18003"  # the Kafka HTTP bridge (only with a broker)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def run_folder() -> Path:
    """Where runtimes of this user keep their sockets (`MLLAMBDA_RUN_DIR`); the control plane's gateway binds
    the shared egress sockets only there (docs/architecture.md, "Same host")."""
    return Path(os.environ.get("MLLAMBDA_RUN_DIR") or Path(tempfile.gettempdir()) / f"mllambda-{os.getuid()}")


def stack_state_dir() -> Path:
    """Where the local stack (`mllambda up`) keeps its state (`MLLAMBDA_STATE_DIR`)."""
    return Path(os.environ.get("MLLAMBDA_STATE_DIR") or PROJECT_ROOT / ".mllambda")


def payload_folders() -> list[Path]:
    """Where this host's runtimes write payload logs by default: the local stack's run folder, then the user's."""
    return [stack_state_dir() / "run" / "payloads", run_folder() / "payloads"]


def resolve(flag: str | None, env_var: str, default: str) -> str:
    """Flags override the environment, the environment overrides defaults."""
    if flag:
        return flag
    return os.environ.get(env_var) or default


@dataclass(frozen=True)
class ConsulAddress:
    scheme: str
    host: str
    port: int
    token: str | None
    ca_file: str | None = None  # https Consul: the CA that signed its certificate (CONSUL_CACERT)

    @classmethod
    def from_settings(cls, addr: str | None = None, token: str | None = None) -> ConsulAddress:
        raw = resolve(addr, "CONSUL_HTTP_ADDR", DEFAULT_CONSUL_ADDR)
        scheme = "http"
        if "://" in raw:
            scheme, raw = raw.split("://", 1)
        host, port = split_host_port(raw, default_port=8500)
        token = token or os.environ.get("CONSUL_HTTP_TOKEN") or None
        return cls(scheme, host, port, token, os.environ.get("CONSUL_CACERT") or None)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def split_host_port(addr: str, default_port: int) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep:
        return addr, default_port
    if not port.isdigit():
        raise ValueError(f"bad address {addr!r}: port must be a number")
    return host.strip("[]") or "127.0.0.1", int(port)


def tools_dir() -> Path:
    """Folder for binaries the project fetches itself (ignored by git)."""
    return Path(os.environ.get("MLLAMBDA_TOOLS_DIR") or PROJECT_ROOT / ".tools")


def model_store_dir(flag: str | None = None) -> Path:
    """Where model packages are kept by digest (`--model-store`, MLLAMBDA_MODEL_STORE)."""
    return Path(resolve(flag, "MLLAMBDA_MODEL_STORE", str(PROJECT_ROOT / ".mllambda" / "models")))


def cache_dir() -> Path:
    """This host's unpacked packages and their environments (MLLAMBDA_CACHE_DIR): rebuilt when missing."""
    return Path(os.environ.get("MLLAMBDA_CACHE_DIR") or PROJECT_ROOT / ".cache" / "mllambda")


SECURITY_MODES = ("mtls", "plaintext")


def add_security_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """`--security mtls|plaintext`, the same flag and MLLAMBDA_SECURITY default for every command."""
    parser.add_argument(
        "--security",
        choices=SECURITY_MODES,
        default=os.environ.get("MLLAMBDA_SECURITY", "plaintext"),
        help=f"mtls: {what} (MLLAMBDA_SECURITY; default plaintext)",
    )


STACK_STATE = "MLLAMBDA_STACK_STATE"  # set by `mllambda up` for the control plane it starts: its stack.json
