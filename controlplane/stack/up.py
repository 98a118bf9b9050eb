"""`mllambda up -f STACK.yaml` / `mllambda down`: the whole local stack, started and stopped by PID.

Order: Consul (reused if one answers) -> control plane -> gateway Envoy ->
runtimes (each with its sidecar) -> pipelines applied -> wait until the gateway
has acknowledged them. Then the supervisor stays: a process that exits is started
again with back-off (supervise.py), replicas follow autoscaling and deployments,
and a restarted dev Consul gets its KV back. `--detach` runs that same supervisor
in the background; `down` stops it, and it stops the rest. Stopping goes in
reverse. Nothing runs in containers.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from contract.naming import DEFAULT_KV_PREFIX
from controlplane import files
from controlplane.config import STACK_STATE, stack_state_dir
from controlplane.errors import CliError
from controlplane.node import processes
from controlplane.node.tools import find_consul, find_tansu
from controlplane.scaling.policy import policies_document
from controlplane.stack.file import RuntimeSpec, Stack, load_stack
from controlplane.stack.replicas import LocalScaler
from controlplane.stack.supervise import TAIL_LINES, Book

STATE_DIR = stack_state_dir()
DETACHED_ENV = "MLLAMBDA_UP_NOTICE"  # set for the background supervisor: where it says "ready" or "failed"
DOWN_TIMEOUT = 90.0  # seconds `down` gives a detached supervisor to stop what it started
KV_COPY_SECONDS = 5.0
MAX_LOG_BYTES = 32 * 1024 * 1024  # per process log (and the supervisor's): older lines move to <name>.log.1
MAX_KV_COPY = 32 * 1024 * 1024  # bytes: a larger KV is not copied (and not given back after a restart)


@dataclass
class Supervisor:
    stack: Stack
    state_dir: Path = STATE_DIR
    started: list[processes.ManagedProcess] = field(default_factory=list)
    consul_url: str = ""
    kafka_flags: list[str] = field(default_factory=list)
    recorded: bool = False  # this supervisor wrote the state file
    ui_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))  # signs a browser in to the dashboard
    scaler: LocalScaler = field(init=False)
    books: dict[str, Book] = field(default_factory=dict)  # restarts, by process name
    kv_copy: list[dict[str, Any]] | None = None  # our dev Consul's KV, to give back if the agent restarts
    kv_copied_at: float = 0.0
    logs_capped_at: float = 0.0
    restore_kv: bool = False  # our Consul was started again: its KV (in memory) is empty until given back
    detached: bool = False  # running in the background for `up --detach` (`down` stops this process)

    def __post_init__(self) -> None:
        self.scaler = LocalScaler(self.stack.ports.consul, DEFAULT_KV_PREFIX, self.start_replica, say)

    def follow_scaling(self) -> None:
        """Replicas as the control plane decided (autoscaled versions only); the stack's record follows."""
        changed, gone = self.scaler.follow()
        if changed or gone:
            self.started = [p for p in self.started if all(p is not g for g in gone)]
            self._record()

    def supervise(self) -> None:
        """One pass: a process that exited starts again after its back-off (supervise.py); the rest serve on.
        Replicas of `mllambda deploy` are the scaler's (the same policy, longer waits)."""
        now = time.monotonic()
        changed = False
        for proc in self.started:
            if self.scaler.is_leaving(proc) or self.scaler.owns(proc):
                continue
            book = self.books.setdefault(proc.name, Book(proc.name, started_at=now))
            if proc.alive():
                book.ran(now)
            elif book.down_pid != proc.pid:
                code = proc.popen.returncode if proc.popen is not None else None
                wait = book.exited(proc.pid, code, proc.tail(TAIL_LINES), now)
                failing = "; failing" if book.state == "failing" else ""
                lines = "\n".join(f"      {line}" for line in book.last_lines.splitlines())
                say(
                    f"==> {proc.name}: {book.last_exit} ({book.exits} in a row{failing}); again in {wait:.0f}s\n{lines}"
                )
                changed = True
            elif book.due(now):
                proc.start()
                book.restarted(now)
                say(f"==> {proc.name}: started again (restart {book.restarts}; log {proc.log_path})")
                self.restore_kv = self.restore_kv or proc.name == "consul"
                changed = True
        if changed:
            self._record()
        self._keep_consul_kv(now)
        if now - self.logs_capped_at >= KV_COPY_SECONDS:
            self.logs_capped_at = now
            for log in self.logs.glob("*.log"):  # every process's, the supervisor's own (stack.log) too
                files.cap_log(log, MAX_LOG_BYTES)

    def _keep_consul_kv(self, now: float) -> None:
        """A dev agent keeps its KV in memory: a copy every few seconds, given back when ours starts again."""
        if not any(p.name == "consul" for p in self.started):
            return  # an agent we did not start is not ours to restore
        url = f"{self.consul_url}/v1/kv/?recurse=true"
        if self.restore_kv:
            if not _consul_answers(self.stack.ports.consul):
                return
            if self.kv_copy:
                restored = _put_kv(self.consul_url, self.kv_copy)
                say(f"==> consul: {restored} keys given back (pipelines, model records, deployments)")
            self.restore_kv = False
            return
        if now - self.kv_copied_at < KV_COPY_SECONDS:
            return
        self.kv_copied_at = now
        try:
            status, body = processes.http_get(url, timeout=2)
        except OSError:
            return
        if status == 200 and len(body) <= MAX_KV_COPY:
            self.kv_copy = json.loads(body)

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    def step(self, message: str) -> None:
        say(f"==> {message}")

    def start(
        self,
        name: str,
        argv: list[str],
        ready: Callable[[], bool],
        timeout: float = 60,
        keep_secrets: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        log = self.logs / f"{name}.log"
        proc = processes.ManagedProcess(name, argv, log, env=env, keep_secrets=keep_secrets).start()
        self.started.append(proc)
        self.books[name] = Book(name, started_at=time.monotonic())
        self._record()
        try:
            proc.wait_ready(ready, timeout=timeout)
        except processes.StartError as err:
            raise CliError(f"{err}\n(full log: {proc.log_path})") from err

    def _record(self) -> None:
        """What `down` needs: each process's PID and start time (a PID alone may be reused by then); and what
        `status` shows: each one's restarts and how it last ended. This supervisor too, when detached."""
        entries = [
            {"name": p.name, "pid": p.pid, "started": processes.start_time(p.pid), **self._book_of(p.name)}
            for p in self.started
        ]
        me = {"name": "supervisor", "pid": os.getpid(), "started": processes.start_time(os.getpid())}
        record = {"stack": self.stack.name, "processes": entries, **({"supervisor": me} if self.detached else {})}
        files.write_whole(self.state_dir / "stack.json", json.dumps(record, indent=2).encode())
        self.recorded = True

    def _book_of(self, name: str) -> dict[str, object]:
        book = self.books.get(name)
        return book.to_json() if book is not None else {}

    def check_ports(self, reuse_consul: bool) -> None:
        p = self.stack.ports
        wanted = {"xds": p.xds, "admin": p.admin, "gateway": p.gateway, "gateway_admin": p.gateway_admin}
        if not reuse_consul:
            wanted["consul"] = p.consul
        if self.stack.kafka:
            wanted.update(kafka=p.kafka, bridge=p.bridge)
        taken = [f"{name} port {port}" for name, port in wanted.items() if not processes.port_is_free(port)]
        if taken:
            raise CliError(
                f"already in use: {', '.join(taken)}.\n"
                "Is a stack already up (mllambda down)? Or choose other ports under `ports:` in the stack file."
            )

    def up(self) -> None:
        if ours_still_running(self.state_dir):
            raise CliError("a stack is already running here: `mllambda down` stops it")
        self.logs.mkdir(parents=True, exist_ok=True)
        p, me = self.stack.ports, [sys.executable, "-m", "controlplane.cli"]
        consul_up = _consul_answers(p.consul)
        self.check_ports(consul_up)
        self.consul_url = f"http://127.0.0.1:{p.consul}"
        if consul_up:
            self.step(f"consul: using the agent already at 127.0.0.1:{p.consul}")
        else:
            consul = find_consul()
            if consul is None:
                raise CliError("consul not found: run ./dev bootstrap (or `mllambda setup`)")
            self.step(f"consul: starting a dev agent on 127.0.0.1:{p.consul}")
            extra = {k: processes.free_port() for k in ("dns", "serf_lan", "serf_wan", "server", "grpc")}
            ca = processes.connect_ca_config(consul, self.state_dir / "consul-ca")  # the same CA across restarts
            argv = processes.consul_dev_argv(consul, self.state_dir / "consul", {"http": p.consul, **extra}, ca)
            self.start("consul", argv, processes.consul_ready(p.consul))
        consul_flag = f"--consul=127.0.0.1:{p.consul}"
        kafka_flags: list[str] = []
        if self.stack.kafka:
            tansu = find_tansu()
            if tansu is None:
                raise CliError("tansu (the Kafka broker) not found: run ./dev bootstrap")
            self.step(f"kafka: starting tansu on 127.0.0.1:{p.kafka}")
            self.start("kafka", processes.tansu_argv(tansu, p.kafka), processes.tcp_ready(p.kafka))
            kafka_flags = [f"--kafka-bootstrap=127.0.0.1:{p.kafka}"]
        self.kafka_flags = kafka_flags  # runtimes get them too
        security = [f"--security={self.stack.security}"]
        envoys = self.state_dir / "envoy"
        mtls = [f"--gateway-tls-dir={envoys / 'gateway-tls'}"] if self.stack.security == "mtls" else []
        autoscale: list[str] = []
        if self.stack.policies:
            (self.state_dir / "autoscale.yaml").write_text(yaml.safe_dump(policies_document(self.stack.policies)))
            autoscale = [f"--autoscale={self.state_dir / 'autoscale.yaml'}"]
        self.step(f"control plane: xDS 127.0.0.1:{p.xds}, admin 127.0.0.1:{p.admin}, security {self.stack.security}")
        self.start(
            "controlplane",
            [
                *me,
                "controlplane",
                f"--xds=127.0.0.1:{p.xds}",
                f"--admin=127.0.0.1:{p.admin}",
                consul_flag,
                f"--gateway-port={p.gateway}",
                f"--gateway-admin-port={p.gateway_admin}",
                f"--metrics-port={p.controlplane_metrics}",
                *kafka_flags,
                *security,
                *mtls,
                *([f"--bridge=127.0.0.1:{p.bridge}"] if kafka_flags else []),
                # OIP over gRPC: clients dial the gateway's port; the front behind it takes any free port
                f"--oip-grpc=127.0.0.1:{processes.free_port()}",
                *autoscale,
            ],
            processes.tcp_ready(p.admin),
            keep_secrets=True,
            # the runtimes' socket folder: the gateway takes their output there (docs/architecture.md, "Same host")
            env={
                "MLLAMBDA_UI_TOKEN": self.ui_token,
                STACK_STATE: str(self.state_dir / "stack.json"),  # the dashboard shows the stack's processes
                "MLLAMBDA_RUN_DIR": str(self.run_dir()),
                "MLLAMBDA_MODEL_STORE": str(self.model_store),
            },
        )
        self.step(f"gateway Envoy: 127.0.0.1:{p.gateway} (admin 127.0.0.1:{p.gateway_admin})")
        self.start(
            "gateway",
            [
                *me,
                "sidecar",
                "--node-id=gateway",
                "--cluster=gateway",
                f"--xds=127.0.0.1:{p.xds}",
                f"--admin-port={p.gateway_admin}",
                f"--config-dir={envoys}",
                *security,
                consul_flag,
                *([f"--concurrency={self.stack.gateway_concurrency}"] if self.stack.gateway_concurrency else []),
            ],
            processes.envoy_ready(p.gateway_admin),
        )
        self.build_packages()
        self.start_runtimes()
        self.apply_pipelines()
        self.summary()

    def run_dir(self) -> Path:
        """Where the stack's runtimes keep their sockets."""
        folder = self.state_dir / "run"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @property
    def model_store(self) -> Path:
        return self.state_dir / "models"

    def build_packages(self) -> None:
        """Every package the stack file names, built (or found unchanged) and stored before its replicas start."""
        from controlplane.admin.client import AdminClient
        from controlplane.admin.model_cli import build_checked, upload

        specs = [s for s in self.stack.runtimes if s.package]
        if not specs:
            return
        self.step(f"model packages: {len(specs)} (each locked with uv, run in its own environment)")
        with AdminClient(f"127.0.0.1:{self.stack.ports.admin}") as admin:
            for spec in specs:
                built = build_checked(Path(spec.package), spec.manifest)
                state = "stored" if upload(admin, built, spec.model, spec.version) else "unchanged"
                say(f"    {spec.model}:{spec.version} {state} (sha256 {built.digest[:12]})")

    def start_replica(self, spec: RuntimeSpec, index: int) -> processes.ManagedProcess:
        """Replica `index` of a model version: `mllambda runtime` with its sidecar, registered when ready."""
        service_id = f"{spec.model}-{spec.version}-{index}"
        me, run_dir = [sys.executable, "-m", "controlplane.cli"], self.run_dir()
        # No target: the model version's package from the store (named in the stack file, or deployed)
        code = ["--package", f"--model-store={self.model_store}"] if spec.from_store else [spec.target]
        argv = [
            *me,
            "runtime",
            *code,
            f"--model={spec.model}",
            f"--version={spec.version}",
            f"--service-id={service_id}",
            f"--consul=127.0.0.1:{self.stack.ports.consul}",
            f"--security={self.stack.security}",
            f"--xds=127.0.0.1:{self.stack.ports.xds}",
            *([f"--loader={spec.loader}"] if spec.loader else []),
            *spec.runtime_args(),
            *self.kafka_flags,
        ]
        env = {"MLLAMBDA_RUN_DIR": str(run_dir)}
        proc = processes.ManagedProcess(service_id, argv, self.logs / f"{service_id}.log", env=env).start()
        self.started.append(proc)
        self._record()
        return proc

    def start_runtimes(self) -> None:
        ids: list[tuple[str, str]] = []
        for spec in self.stack.runtimes:
            replicas = [self.start_replica(spec, i) for i in range(spec.replicas)]
            ids += [(spec.model, proc.name) for proc in replicas]
            self.scaler.adopt(spec, replicas)  # autoscale records or `mllambda deploy` may change the count
        self.step(f"runtimes: starting {len(ids)} (each with its own Envoy sidecar)")
        deadline, shown = time.monotonic() + 180, ""
        while True:
            waiting = [sid for model, sid in ids if not _passing(self.stack.ports.consul, model, sid)]
            for proc in self.started:
                if not proc.alive():
                    raise CliError(f"{proc.name} exited during start-up:\n{proc.tail()}\n(full log: {proc.log_path})")
            line = f"    {len(ids) - len(waiting)}/{len(ids)} passing" + (
                f"; waiting for {', '.join(waiting[:4])}" if waiting else ""
            )
            if line != shown:
                say(line)
                shown = line
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise CliError(
                    f"runtimes not passing their Consul checks after 180s: {', '.join(waiting)} (logs in {self.logs})"
                )
            time.sleep(0.5)

    def apply_pipelines(self) -> None:
        from controlplane.admin.client import AdminClient

        client = AdminClient(f"127.0.0.1:{self.stack.ports.admin}")
        for pipeline in self.stack.pipelines:
            reply = client.apply(pipeline)
            state = "created" if reply.created else "unchanged"
            self.step(f"pipeline/{pipeline.name} {state} (version {reply.pipeline.version})")
            deadline = time.monotonic() + 30
            while not client.gateway_has(pipeline.name, reply.pipeline.version):
                if time.monotonic() > deadline:
                    raise CliError(f"the gateway did not acknowledge pipeline {pipeline.name} in 30s")
                time.sleep(0.2)
            say(f"    gateway Envoy acknowledged pipeline/{pipeline.name} v{reply.pipeline.version}")

    def summary(self) -> None:
        p = self.stack.ports
        first = self.stack.pipelines[0].name if self.stack.pipelines else "NAME"
        say(
            f"""
ML Lambda stack '{self.stack.name}' is up.
  gateway        http://127.0.0.1:{p.gateway}/pipelines/<name>
  try it         .venv/bin/mllambda invoke {first} --data '{{"text": "the striker scored a brilliant goal"}}'
  admin gRPC     127.0.0.1:{p.admin}   (mllambda get pipelines)
  dashboard      http://127.0.0.1:{p.controlplane_metrics}/   (metrics: /metrics)
  sign in there  http://127.0.0.1:{p.controlplane_metrics}/login?token={self.ui_token}   (to change pipelines)
  Consul UI      {self.consul_url}/ui/
  Envoy admin    gateway http://127.0.0.1:{p.gateway_admin}/ ; sidecars: `mllambda describe pipeline {first}`
  logs           {self.logs}
"""
        )

    def stop_all(self) -> None:
        """Reverse order; runtimes together (each drains on its own)."""
        runtimes = [p for p in self.started if p.name not in ("consul", "controlplane", "gateway", "kafka")]
        for proc in runtimes:
            proc.signal(signal.SIGTERM)
        for proc in reversed(self.started):
            proc.stop(timeout=15)
        if self.recorded:  # never another stack's record (a second `up` that was refused)
            (self.state_dir / "stack.json").unlink(missing_ok=True)


def _put_kv(consul_url: str, items: list[dict[str, Any]]) -> int:
    """Keys and values (as Consul's recurse listing gives them) written back in transactions of 64."""
    done = 0
    for start in range(0, len(items), 64):
        ops = [
            {"KV": {"Verb": "set", "Key": i["Key"], "Value": i.get("Value") or "", "Flags": i.get("Flags", 0)}}
            for i in items[start : start + 64]
        ]
        request = urllib.request.Request(f"{consul_url}/v1/txn", data=json.dumps(ops).encode(), method="PUT")
        try:
            with urllib.request.urlopen(request, timeout=5):
                done += len(ops)
        except OSError as err:
            say(f"    consul: giving keys back failed: {err}", err=True)
    return done


def _consul_answers(port: int) -> bool:
    try:
        return processes.consul_ready(port)()
    except (OSError, ValueError):
        return False


def _passing(consul_port: int, service: str, service_id: str) -> bool:
    try:
        status, body = processes.http_get(f"http://127.0.0.1:{consul_port}/v1/health/service/{service}?passing=true")
    except OSError:
        return False
    return status == 200 and service_id in {e["Service"]["ID"] for e in json.loads(body)}


def say(text: str, err: bool = False) -> None:
    """Print, unless nobody reads any more (`up | tee` and Ctrl-C): stopping must not depend on stdout."""
    try:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
    except (BrokenPipeError, OSError):
        pass


def _recorded(state_dir: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((state_dir / "stack.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _ours(item: dict[str, Any]) -> bool:
    """Is the recorded process still the one we started (same PID and start time)?"""
    started = processes.start_time(int(item["pid"]))
    return started is not None and started == item.get("started")


def ours_still_running(state_dir: Path) -> bool:
    state = _recorded(state_dir)
    return state is not None and any(_ours(item) for item in state.get("processes", []))


def down(state_dir: Path = STATE_DIR) -> int:
    state = _recorded(state_dir)
    if state is None:
        say("no stack is running here")
        return 0
    supervisor = state.get("supervisor")
    if isinstance(supervisor, dict) and _ours(supervisor):  # detached: it stops what it started, in order
        say(f"stopping the stack's supervisor (pid {supervisor['pid']}) and what it started")
        processes.stop_group(int(supervisor["pid"]), timeout=DOWN_TIMEOUT)
        state = _recorded(state_dir) or {"stack": state.get("stack"), "processes": []}
    for item in reversed(state.get("processes", [])):
        if _ours(item):
            say(f"stopping {item['name']} (pid {item['pid']})")
            processes.stop_group(int(item["pid"]), timeout=15)
        elif processes.exists(int(item["pid"])):
            say(f"pid {item['pid']} is no longer our {item['name']} (the PID was reused): left alone")
    (state_dir / "stack.json").unlink(missing_ok=True)
    say(f"stack '{state.get('stack', '?')}' stopped")
    return 0


def stack_processes(state_dir: Path = STATE_DIR) -> list[dict[str, Any]]:
    """The local stack's processes as its supervisor last recorded them (alive: still the one started)."""
    state = _recorded(state_dir)
    if state is None:
        return []
    return [{**item, "alive": _ours(item)} for item in state.get("processes", []) if isinstance(item, dict)]


def detach(args: argparse.Namespace, state_dir: Path = STATE_DIR) -> int:
    """`up --detach`: the same supervisor, in the background (its own session); its progress shown here
    until the stack is up (or fails), then this command returns and the supervisor goes on."""
    if ours_still_running(state_dir):
        raise CliError("a stack is already running here: `mllambda down` stops it")
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    notice = state_dir / "up.status"
    notice.unlink(missing_ok=True)
    log_path = logs / "stack.log"
    argv = [sys.executable, "-m", "controlplane.cli", "up", "-f", str(Path(args.filename).resolve())]
    log_path.unlink(missing_ok=True)  # a fresh log per stack; appended to, so the supervisor can cap it in place
    with log_path.open("ab") as log:
        child = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, DETACHED_ENV: str(notice)},
        )
    try:
        with log_path.open("rb") as progress:  # read on as it grows: each line shown once

            def show() -> None:
                text = progress.read().decode(errors="replace").rstrip("\n")
                if text:
                    say(text)

            while True:
                show()
                state = notice.read_text().strip() if notice.exists() else ""
                if state == "ready":
                    say(f"running in the background, supervised (log {log_path}): `mllambda down` stops it")
                    return 0
                if state == "failed" or child.poll() is not None:
                    child.wait(timeout=60)
                    show()
                    raise CliError(f"the stack did not come up (log {log_path})")
                time.sleep(0.2)
    except KeyboardInterrupt:
        child.send_signal(signal.SIGTERM)  # it stops what it started
        child.wait(timeout=DOWN_TIMEOUT)
        return 130


def cmd_up(args: argparse.Namespace) -> int:
    stack = load_stack(Path(args.filename))
    notice = os.environ.pop(DETACHED_ENV, "")  # set: this is the background supervisor of `up --detach`
    if args.detach and not notice:
        return detach(args)
    supervisor = Supervisor(stack, detached=bool(notice))
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a closed terminal stops the stack like Ctrl-C
        signal.signal(sig, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # Ctrl-C stops the stack even when `up` was started by something that ignores SIGINT (a job started
    # with `&` from a script inherits SIG_IGN, and Python then keeps it ignored): found by a CI run so started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        supervisor.up()
        if notice:
            files.write_whole(Path(notice), b"ready\n")
        else:
            say("Ctrl-C stops everything.")
        while True:
            time.sleep(0.5)
            supervisor.follow_scaling()
            supervisor.supervise()
    except KeyboardInterrupt:
        say("\n==> stopping")
        return 0
    except BaseException:
        say("==> start failed; stopping what was started", err=True)
        if notice:
            files.write_whole(Path(notice), b"failed\n")
        raise
    finally:
        supervisor.stop_all()


def cmd_down(args: argparse.Namespace) -> int:
    return down()


def add_command(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="run the local stack: Consul, control plane, gateway, runtimes, pipelines")
    up.add_argument("-f", "--filename", required=True, help="stack file (kind: Stack)")
    up.add_argument(
        "-d", "--detach", action="store_true", help="supervise in the background once ready; `mllambda down` stops it"
    )
    up.set_defaults(handler=cmd_up)
    down_parser = sub.add_parser("down", help="stop the stack started with `mllambda up --detach`")
    down_parser.set_defaults(handler=cmd_down)
