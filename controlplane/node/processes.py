"""Start, wait for, and stop the real components (Envoy, Consul, tansu, runtimes).

Shared by the test fixtures and the local-stack supervisor, so both start
things the same way and both stop exactly what they started, by PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.files import private_dir


class StartError(RuntimeError):
    """A component did not become ready; the message carries its last log lines."""


PORT_HOLD_SECONDS = 120.0


def free_port() -> int:
    """A loopback port free for TCP and UDP that no process on this machine took lately.

    The kernel may hand the same ephemeral port to two bind(0) calls in a row (or
    to two processes before either binds it); Consul refuses to start when two of
    its ports collide. So each port handed out is marked in a shared folder and
    not handed out again, by any process, for PORT_HOLD_SECONDS.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port_is_free(port, kind=socket.SOCK_DGRAM) and _claim(port):
            return port


def _claim(port: int) -> bool:
    folder = private_dir(Path(tempfile.gettempdir()) / f"mllambda-ports-{os.getuid()}")
    mark = folder / str(port)
    try:
        os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        try:
            if time.time() - mark.stat().st_mtime < PORT_HOLD_SECONDS:
                return False
            mark.touch()
            return True
        except FileNotFoundError:
            return False


def port_is_free(port: int, host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> bool:
    """Nobody has `port` bound (TCP by default; socket.SOCK_DGRAM for UDP).

    Connections of a process that just stopped linger in TIME_WAIT for a minute;
    servers (Consul, Envoy, gRPC) bind with SO_REUSEADDR and ignore them, so the
    check does too: `down` then `up` works at once.
    """
    with socket.socket(socket.AF_INET, kind) as sock:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


SECRET_ENV = ("MLLAMBDA_TOKEN", "MLLAMBDA_UI_TOKEN", "CONSUL_HTTP_TOKEN")  # credentials no runtime or Envoy inherits


def child_env(keep_secrets: bool = False) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if keep_secrets or k not in SECRET_ENV}


@dataclass
class ManagedProcess:
    """One child process in its own session, with its output in a log file."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: dict[str, str] | None = None
    die_with_parent: bool = False  # Linux: SIGKILL this child if its parent dies, even by SIGKILL
    keep_secrets: bool = False  # pass on the admin and Consul tokens (only the control plane needs them)
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**child_env(keep_secrets=self.keep_secrets), **(self.env or {})},
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was not started"
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, check: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise StartError(f"{self.name} exited during start-up:\n{self.tail()}")
            try:
                if check():
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise StartError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after `timeout`. A process that has exited and
        been reaped is not signalled by its PID (the number may be another process's by now): only what is left
        of its group is killed."""
        if self.popen is None:
            return
        if self.popen.poll() is not None:
            kill_leftovers(self.pid)
            return
        stop_group(self.pid, timeout, wait=self.popen.wait)


def stop_group(pid: int, timeout: float = 10.0, wait: Callable[[float], object] | None = None) -> None:
    """Stop a process group by its leader's PID: SIGTERM, then SIGKILL after `timeout`. `wait` (a child's
    Popen.wait) reaps the leader; without it the leader is not ours and is polled until it is gone."""
    born = start_time(pid)  # a leader not ours is the same process while its start time is the same
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + timeout
    if wait is not None:
        try:
            wait(timeout)
            alive = False
        except subprocess.TimeoutExpired:
            alive = True
    else:

        def leader_lives() -> bool:  # a leader already gone (born None) is not waited for; its group is finished
            return born is not None and start_time(pid) == born

        while time.monotonic() < deadline and leader_lives():
            time.sleep(0.05)
        alive = leader_lives()
    finish_group(pid, leader_alive=alive)


def finish_group(pgid: int, leader_alive: bool) -> None:
    """After a stop's grace: SIGKILL the whole group if its leader outlived it, else only what is left of it
    (a straggler, a grandchild). `leader_alive` must come from an exact test (a child's poll()), not from
    the PID, which may name another process once the leader is reaped."""
    if leader_alive:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    else:
        kill_leftovers(pgid)


def kill_leftovers(pgid: int) -> None:
    """SIGKILL what is left of process group `pgid`, whose leader has exited and been reaped.

    PIDs wrap (32,768 by default, threads included) and a reaped leader's number may be handed to a new process.
    Linux never hands out the number of a group that still has members; so if a process with that number exists,
    the group is gone and the number is someone else's now: nothing is signalled. (A CI run's control plane once
    stopped answering in the middle of a test, alive: very likely SIGTERMed by such a stale PID.)
    """
    if exists(pgid) or not group_has_members(pgid):
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def group_has_members(pgid: int) -> bool:
    """Does any process belong to process group `pgid` (/proc/PID/stat field 5)?"""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid):
            return True
    return False


def stop_all(procs: Sequence[ManagedProcess], timeout: float = 10.0) -> None:
    """Stop several at once: each is told (SIGTERM) before any is waited for, so their drains overlap; whatever
    is left after `timeout` is killed (SIGKILL), as `stop` does for one."""
    told = []
    for proc in procs:
        if proc.popen is not None and proc.popen.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                told.append(proc)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + timeout
    for proc in told:
        assert proc.popen is not None
        try:
            proc.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:  # stragglers and grandchildren go now
        if proc.popen is not None:
            finish_group(proc.pid, leader_alive=proc.popen.poll() is None)


def start_time(pid: int) -> int | None:
    """When a process started (clock ticks since boot, /proc/PID/stat field 22); None if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_parent() -> None:
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def http_send(url: str, method: str, data: bytes = b"", timeout: float = 2.0) -> int:
    """PUT or DELETE `data` at `url`: the status (0: nobody answered)."""
    request = urllib.request.Request(url, data=data if method != "DELETE" else None, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def consul_ready(http_port: int) -> Callable[[], bool]:
    """Consul answers and has elected a leader (KV writes work from then on)."""

    def check() -> bool:
        status, body = http_get(f"http://127.0.0.1:{http_port}/v1/status/leader")
        return status == 200 and bool(json.loads(body))

    return check


def envoy_ready(admin_port: int) -> Callable[[], bool]:
    def check() -> bool:
        status, body = http_get(f"http://127.0.0.1:{admin_port}/ready")
        return status == 200 and body.strip() == "LIVE"

    return check


def tcp_ready(port: int) -> Callable[[], bool]:
    def check() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True

    return check


def consul_dev_argv(consul: Path, data_dir: Path, ports: dict[str, int], config: Path | None = None) -> list[str]:
    """`consul agent -dev` on loopback, every port chosen by the caller; `config`: a file of more settings."""
    return [
        str(consul),
        "agent",
        "-dev",
        "-bind=127.0.0.1",
        "-client=127.0.0.1",
        f"-data-dir={data_dir}",
        f"-http-port={ports['http']}",
        f"-dns-port={ports['dns']}",
        f"-serf-lan-port={ports['serf_lan']}",
        f"-serf-wan-port={ports['serf_wan']}",
        f"-server-port={ports['server']}",
        f"-grpc-port={ports['grpc']}",
        "-log-level=warn",
        *([f"-config-file={config}"] if config else []),
    ]


def connect_ca_config(consul: Path, folder: Path) -> Path:
    """A Consul config file that gives Connect's built-in CA a key and root made once in `folder` (kept there):
    a dev agent keeps nothing across a restart, and would otherwise make a new CA each time, so every
    certificate in the mesh would change under the traffic. Its trust domain still changes (the cluster's id
    does); identities are matched in any trust domain (contract.naming.spiffe_regex)."""
    config = folder / "connect-ca.json"
    if config.exists():
        return config
    private_dir(folder)
    made = subprocess.run(
        [str(consul), "tls", "ca", "create", "-domain", "mllambda", "-days", "3650"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if made.returncode != 0:
        raise RuntimeError(f"consul tls ca create failed: {made.stderr.strip()[-300:]}")
    key, root = folder / "mllambda-agent-ca-key.pem", folder / "mllambda-agent-ca.pem"
    ca = {"private_key": key.read_text(), "root_cert": root.read_text()}
    config.write_text(json.dumps({"connect": {"enabled": True, "ca_provider": "consul", "ca_config": ca}}))
    config.chmod(0o600)
    key.unlink()  # the config holds it
    return config


def tansu_argv(tansu: Path, port: int) -> list[str]:
    url = f"tcp://127.0.0.1:{port}"
    return [
        str(tansu),
        "broker",
        f"--listener-url={url}",
        f"--advertised-listener-url={url}",
        "--storage-engine=memory://tansu/",
    ]


def envoy_argv(envoy: Path, config_path: Path, concurrency: int | None = None) -> list[str]:
    """`concurrency`: worker threads (Envoy's default is one per core)."""
    argv = [
        str(envoy),
        "-c",
        str(config_path),
        "--disable-hot-restart",
        "--log-level",
        "warn",
    ]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    return argv
