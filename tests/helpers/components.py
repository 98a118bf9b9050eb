"""The real components a test starts, as handles: a Consul agent, an Envoy, a control plane, a runtime.

The fixtures in conftest.py start and stop them; tests and helpers import the handles from here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from controlplane.node import processes
from controlplane.node.processes import ManagedProcess
from controlplane.node.tools import find_consul
from tests.helpers.paths import short_dir


@dataclass(frozen=True)
class ConsulAgent:
    http_port: int
    proc: processes.ManagedProcess
    ports: dict[str, int]

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.http_port}"


@dataclass(frozen=True)
class EnvoyProc:
    admin_port: int
    proc: processes.ManagedProcess

    def admin(self, path: str) -> tuple[int, str]:
        return processes.http_get(f"http://127.0.0.1:{self.admin_port}{path}")


def require(path: Path | None, name: str) -> Path:
    if path is None:
        pytest.fail(f"{name} not found: run ./dev bootstrap (mllambda doctor says what is missing)")
    return path


def start_consul(
    logs_dir: Path, data_dir: Path, ports: dict[str, int] | None = None, persistent: bool = False
) -> ConsulAgent:
    """A dev agent, or (persistent) a one-node server that keeps its data across restarts."""
    names = ("http", "dns", "serf_lan", "serf_wan", "server", "grpc")
    ports = ports or {k: processes.free_port() for k in names}
    argv = processes.consul_dev_argv(require(find_consul(), "consul"), data_dir, ports)
    if persistent:
        argv = [a for a in argv if a != "-dev"] + ["-server", "-bootstrap-expect=1"]
    proc = processes.ManagedProcess("consul", argv, logs_dir / f"consul-{ports['http']}.log")
    proc.start()
    try:
        proc.wait_ready(processes.consul_ready(ports["http"]), timeout=30)
    except processes.StartError:
        proc.stop()
        raise
    return ConsulAgent(ports["http"], proc, ports)


Bootstrap = dict[str, Any] | Callable[[int], str]
EnvoyFactory = Callable[..., EnvoyProc]


@dataclass
class ControlPlaneProc:
    """A real `mllambda controlplane` process; restartable on the same ports."""

    xds_port: int
    admin_port: int
    consul_port: int
    kv_prefix: str
    log_path: Path
    gateway_port: int = 0
    gateway_admin_port: int = field(default_factory=processes.free_port)
    metrics_port: int = field(default_factory=processes.free_port)
    bridge_port: int = field(default_factory=processes.free_port)  # the Kafka HTTP bridge (with a broker)
    env: dict[str, str] = field(default_factory=dict)
    run_dir: str = field(default_factory=lambda: str(short_dir()))  # its runtimes' sockets
    extra_args: list[str] = field(default_factory=list)
    proc: ManagedProcess | None = None
    ui_token: str = field(default_factory=lambda: uuid.uuid4().hex)  # signs a browser in to the dashboard
    last_stop: str = "none"  # how the last stop went (said when a call is refused after a restart)

    @property
    def admin_addr(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    @property
    def xds_addr(self) -> str:
        return f"127.0.0.1:{self.xds_port}"

    def start(self) -> ControlPlaneProc:
        argv = [
            sys.executable,
            "-m",
            "controlplane.cli",
            "controlplane",
            f"--xds={self.xds_addr}",
            f"--admin={self.admin_addr}",
            f"--consul=127.0.0.1:{self.consul_port}",
            f"--kv-prefix={self.kv_prefix}",
            f"--gateway-port={self.gateway_port or processes.free_port()}",
            f"--gateway-admin-port={self.gateway_admin_port}",
            f"--metrics-port={self.metrics_port}",
            f"--bridge=127.0.0.1:{self.bridge_port}",
            *self.extra_args,
        ]
        env = {"MLLAMBDA_UI_TOKEN": self.ui_token, "MLLAMBDA_RUN_DIR": self.run_dir, **self.env}
        self.proc = ManagedProcess("controlplane", argv, self.log_path, env=env).start()
        self.proc.wait_ready(processes.tcp_ready(self.admin_port), timeout=30)
        self.proc.wait_ready(processes.tcp_ready(self.metrics_port), timeout=30)  # the dashboard starts after
        return self

    def stop(self) -> None:
        if self.proc is not None:
            began = time.monotonic()
            self.proc.stop()
            self.last_stop = f"pid {self.proc.pid} took {time.monotonic() - began:.1f} s, exit {self.proc.popen.poll()}"  # type: ignore[union-attr]

    def cli(
        self, *args: str, stdin: str | None = None, token: str = "", timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run `mllambda ARGS` against this control plane, as a user would (`timeout`: a build that makes an
        environment for the first time, several at once on a loaded machine, takes longer)."""
        env = {**os.environ, "MLLAMBDA_ADMIN_ADDR": self.admin_addr, "MLLAMBDA_TOKEN": token}
        done = subprocess.run(
            [sys.executable, "-m", "controlplane.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            input=stdin,
            timeout=timeout,
        )
        if "Connection refused" in done.stderr and self.proc is not None:  # say what the control plane was doing
            from tests.helpers.sockets import listeners

            state = "alive" if self.proc.alive() else f"exited ({self.proc.popen and self.proc.popen.poll()})"
            done.stderr += (
                f"\n[control plane pid {self.proc.pid} {state}; listening on its admin port now: "
                f"{listeners(self.admin_port)}; its last stop: {self.last_stop}; its log ends:]\n{self.proc.tail(40)}"
            )
        return done


@dataclass
class RuntimeProc:
    service_id: str
    model: str
    version: str
    proc: ManagedProcess
    consul_port: int = 0

    def wait_passing(self, timeout: float = 30) -> RuntimeProc:
        self.proc.wait_ready(lambda: consul_passing(self.consul_port, self.model, self.service_id), timeout=timeout)
        return self


def passing(*runtimes: RuntimeProc) -> list[RuntimeProc]:
    """Runtimes started with wait=False, waited for together: their start-ups overlap."""
    return [runtime.wait_passing() for runtime in runtimes]


def consul_passing(consul_port: int, service: str, service_id: str) -> bool:
    status, body = processes.http_get(f"http://127.0.0.1:{consul_port}/v1/health/service/{service}?passing=true")
    return status == 200 and service_id in {e["Service"]["ID"] for e in json.loads(body)}
