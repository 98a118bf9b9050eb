"""Hosts for multi-host tests: Linux network namespaces joined by veth pairs to a bridge in a namespace of
their own (the machine's own namespace gets no interface), on a private /24. Everything is torn down,
processes first, by `close()`."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.node.processes import ManagedProcess


def unavailable() -> str | None:
    """Why namespaces cannot be used here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"mllprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


@dataclass
class Hosts:
    count: int
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:5])
    subnet: int = field(default_factory=lambda: 100 + uuid.uuid4().int % 100)  # 10.<subnet>.0.0/24
    started: list[ManagedProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.names = [f"mll{self.tag}h{i}" for i in range(self.count)]
        self.ips = [f"10.{self.subnet}.0.{i + 1}" for i in range(self.count)]
        self.switch = f"mll{self.tag}sw"

    def open(self) -> Hosts:
        _ip("netns", "add", self.switch)
        _ip("link", "add", "br0", "type", "bridge", ns=self.switch)
        _ip("link", "set", "br0", "up", ns=self.switch)
        for i, (name, ip) in enumerate(zip(self.names, self.ips, strict=True)):
            _ip("netns", "add", name)
            _ip("link", "set", "lo", "up", ns=name)
            inside, outside = f"v{self.tag}{i}a", f"v{self.tag}{i}b"
            _ip("link", "add", inside, "netns", name, "type", "veth", "peer", "name", outside, "netns", self.switch)
            _ip("link", "set", outside, "master", "br0", ns=self.switch)
            _ip("link", "set", outside, "up", ns=self.switch)
            _ip("addr", "add", f"{ip}/24", "dev", inside, ns=name)
            _ip("link", "set", inside, "up", ns=name)
        return self

    def start(
        self, host: int, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None
    ) -> ManagedProcess:
        proc = ManagedProcess(name, ["ip", "netns", "exec", self.names[host], *argv], log, env=env, keep_secrets=True)
        self.started.append(proc.start())
        return proc

    def run(self, host: int, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.names[host], *argv], capture_output=True, text=True, timeout=timeout
        )

    def link(self, host: int, up: bool) -> None:
        """Cut (or restore) a host's only link: its processes live on, unreachable."""
        _ip("link", "set", f"v{self.tag}{host}a", "up" if up else "down", ns=self.names[host])

    def kill(self, host: int) -> None:
        """Every process in the host's namespace, at once (SIGKILL): the host is gone."""
        pids = subprocess.run(["ip", "netns", "pids", self.names[host]], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass

    def close(self) -> None:
        for proc in reversed(self.started):
            proc.stop(timeout=5)
        for host in range(self.count):
            self.kill(host)
        for name in [*self.names, self.switch]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
