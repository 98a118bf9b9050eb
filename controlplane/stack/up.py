"""`mllambda up -f STACK.yaml` / `mllambda down`: the whole local stack, started and stopped by PID.

Order: Consul (reused if one answers) -> control plane -> gateway Envoy ->
runtimes (each with its sidecar) -> pipelines applied -> wait until the gateway
has acknowledged them. Stopping goes in reverse. Nothing runs in containers.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from contract.naming import DEFAULT_KV_PREFIX
from controlplane.config import PROJECT_ROOT
from controlplane.errors import CliError
from controlplane.node import processes
from controlplane.node.tools import find_consul, find_tansu
from controlplane.scaling.policy import policies_document
from controlplane.stack.file import RuntimeSpec, Stack, load_stack
from controlplane.stack.replicas import LocalScaler

STATE_DIR = Path(os.environ.get("MLLAMBDA_STATE_DIR") or PROJECT_ROOT / ".mllambda")


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

    def __post_init__(self) -> None:
        self.scaler = LocalScaler(self.stack.ports.consul, DEFAULT_KV_PREFIX, self.start_replica, say)

    def follow_scaling(self) -> None:
        """Replicas as the control plane decided (autoscaled versions only); the stack's record follows."""
        changed, gone = self.scaler.follow()
        if changed or gone:
            self.started = [p for p in self.started if all(p is not g for g in gone)]
            self._record()

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
        self._record()
        try:
            proc.wait_ready(ready, timeout=timeout)
        except processes.StartError as err:
            raise CliError(f"{err}\n(full log: {proc.log_path})") from err

    def _record(self) -> None:
        """What `down` needs: each process's PID and start time (a PID alone may be reused by then)."""
        entries = [{"name": p.name, "pid": p.pid, "started": processes.start_time(p.pid)} for p in self.started]
        (self.state_dir / "stack.json").write_text(
            json.dumps({"stack": self.stack.name, "processes": entries}, indent=2)
        )
        self.recorded = True

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
            argv = processes.consul_dev_argv(consul, self.state_dir / "consul", {"http": p.consul, **extra})
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
                *autoscale,
            ],
            processes.tcp_ready(p.admin),
            keep_secrets=True,
            # the runtimes' socket folder: the gateway takes their output there (docs/architecture.md, "Same host")
            env={
                "MLLAMBDA_UI_TOKEN": self.ui_token,
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
        code = [spec.target] if spec.target else ["--package", f"--model-store={self.model_store}"]
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
            *spec.args,
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
    for item in reversed(state.get("processes", [])):
        if _ours(item):
            say(f"stopping {item['name']} (pid {item['pid']})")
            processes.stop_group(int(item["pid"]), timeout=15)
        elif processes.exists(int(item["pid"])):
            say(f"pid {item['pid']} is no longer our {item['name']} (the PID was reused): left alone")
    (state_dir / "stack.json").unlink(missing_ok=True)
    say(f"stack '{state.get('stack', '?')}' stopped")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    supervisor = Supervisor(load_stack(Path(args.filename)))
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a closed terminal stops the stack like Ctrl-C
        signal.signal(sig, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # Ctrl-C stops the stack even when `up` was started by something that ignores SIGINT (a job started
    # with `&` from a script inherits SIG_IGN, and Python then keeps it ignored): found by a CI run so started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    detached = False
    try:
        supervisor.up()
        if args.detach:
            detached = True
            say("running in the background: `mllambda down` stops it")
            if supervisor.stack.policies:
                say("note: autoscaling is decided, but replicas start and stop only under a foreground `mllambda up`")
            say("note: `mllambda deploy` takes effect under a foreground `mllambda up` (supervision: issue #43)")
            return 0
        say("Ctrl-C stops everything.")
        while True:
            time.sleep(0.5)
            supervisor.follow_scaling()
            dead = [
                p
                for p in supervisor.started
                if not p.alive() and not supervisor.scaler.is_leaving(p) and not supervisor.scaler.owns(p)
            ]
            if dead:
                raise CliError(f"{dead[0].name} exited:\n{dead[0].tail()}")
    except KeyboardInterrupt:
        say("\n==> stopping")
        return 0
    except BaseException:
        say("==> start failed; stopping what was started", err=True)
        raise
    finally:
        if not detached:
            supervisor.stop_all()


def cmd_down(args: argparse.Namespace) -> int:
    return down()


def add_command(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="run the local stack: Consul, control plane, gateway, runtimes, pipelines")
    up.add_argument("-f", "--filename", required=True, help="stack file (kind: Stack)")
    up.add_argument("-d", "--detach", action="store_true", help="return once ready; stop with `mllambda down`")
    up.set_defaults(handler=cmd_up)
    down_parser = sub.add_parser("down", help="stop the stack started with `mllambda up --detach`")
    down_parser.set_defaults(handler=cmd_down)
