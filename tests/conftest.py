"""Real Envoy, Consul and Kafka (tansu) on free loopback ports, stopped by PID."""

from __future__ import annotations

import json
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controlplane.node import processes
from controlplane.node.processes import ManagedProcess
from controlplane.node.tools import find_envoy, find_tansu
from tests.helpers.components import (
    Bootstrap,
    ConsulAgent,
    ControlPlaneProc,
    EnvoyFactory,
    EnvoyProc,
    RuntimeProc,
    passing,
    require,
    start_consul,
)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running() -> Iterator[None]:
    """A process a test started and no fixture stopped (one that failed half way through its set-up) is stopped
    when the session ends, and named in a warning: it must not outlive the run (a Consul agent once did)."""
    started: list[ManagedProcess] = []
    original = ManagedProcess.start

    def start(self: ManagedProcess) -> ManagedProcess:
        started.append(self)
        return original(self)

    ManagedProcess.start = start  # type: ignore[method-assign]
    yield
    ManagedProcess.start = original  # type: ignore[method-assign]
    left = [proc for proc in started if proc.alive()]
    for proc in left:
        proc.stop(timeout=5)
    if left:
        warnings.warn(f"left running by the tests, stopped now: {', '.join(p.name for p in left)}", stacklevel=1)


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def consul_agent(logs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsulAgent]:
    agent = start_consul(logs_dir, tmp_path_factory.mktemp("consul"))
    yield agent
    agent.proc.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(logs_dir: Path) -> Iterator[str]:
    port = processes.free_port()
    argv = processes.tansu_argv(require(find_tansu(), "tansu"), port)
    proc = processes.ManagedProcess("tansu", argv, logs_dir / f"tansu-{port}.log").start()
    try:
        proc.wait_ready(processes.tcp_ready(port), timeout=30)
        yield f"127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture
def start_envoy(logs_dir: Path, tmp_path: Path) -> Iterator[EnvoyFactory]:
    """Start an Envoy from a static bootstrap dict, or from `render(admin_port) -> YAML`."""
    started: list[EnvoyProc] = []
    envoy = require(find_envoy(), "envoy")

    def start(bootstrap: Bootstrap, wait_live: bool = True, admin_port: int = 0) -> EnvoyProc:
        admin_port = admin_port or processes.free_port()
        if callable(bootstrap):
            text = bootstrap(admin_port)
        else:
            admin = {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
            text = json.dumps({**bootstrap, "admin": {"address": admin}})
        path = tmp_path / f"envoy-{admin_port}.yaml"
        path.write_text(text)
        proc = processes.ManagedProcess(
            "envoy", processes.envoy_argv(envoy, path), logs_dir / f"envoy-{admin_port}.log"
        ).start()
        started.append(EnvoyProc(admin_port, proc))
        if wait_live:
            proc.wait_ready(processes.envoy_ready(admin_port), timeout=30)
        return started[-1]

    yield start
    processes.stop_all([item.proc for item in started])


@pytest.fixture
def control_plane(consul_agent: ConsulAgent, logs_dir: Path) -> Iterator[ControlPlaneProc]:
    plane = ControlPlaneProc(
        processes.free_port(),
        processes.free_port(),
        consul_agent.http_port,
        f"test-{uuid.uuid4().hex[:8]}/",
        logs_dir / f"controlplane-{uuid.uuid4().hex[:6]}.log",
        processes.free_port(),
    ).start()
    yield plane
    plane.stop()


@pytest.fixture
def kafka_plane(control_plane: ControlPlaneProc, kafka_bootstrap: str) -> ControlPlaneProc:
    """The control plane, restarted with a Kafka broker (before any runtime starts)."""
    control_plane.stop()
    control_plane.env = {**control_plane.env, "MLLAMBDA_KAFKA_BOOTSTRAP": kafka_bootstrap}
    control_plane.start()
    return control_plane


@pytest.fixture
def start_runtime(
    control_plane: ControlPlaneProc, consul_agent: ConsulAgent, logs_dir: Path
) -> Iterator[Callable[..., RuntimeProc]]:
    """Start `mllambda runtime` (with its own Envoy sidecar); wait until Consul says passing."""
    started: list[RuntimeProc] = []
    run_dir = control_plane.run_dir  # the gateway takes the output of runtimes there (Same host, shared)

    def start(
        target: str, model: str, version: str, wait: bool = True, xds: str = "", extra: tuple[str, ...] = ()
    ) -> RuntimeProc:
        service_id = f"{model}-{version}-{uuid.uuid4().hex[:6]}"
        argv = [
            sys.executable,
            "-m",
            "controlplane.cli",
            "runtime",
            target,
            f"--model={model}",
            f"--version={version}",
            f"--service-id={service_id}",
            f"--consul=127.0.0.1:{consul_agent.http_port}",
            f"--xds={xds or control_plane.xds_addr}",
            "--drain-seconds=1.5",
            *extra,
        ]
        env = {"MLLAMBDA_RUN_DIR": run_dir, "MLLAMBDA_KV_PREFIX": control_plane.kv_prefix}
        env["MLLAMBDA_KAFKA_BOOTSTRAP"] = control_plane.env.get("MLLAMBDA_KAFKA_BOOTSTRAP", "")
        proc = ManagedProcess(f"runtime {service_id}", argv, logs_dir / f"{service_id}.log", env=env).start()
        runtime = RuntimeProc(service_id, model, version, proc, consul_agent.http_port)
        started.append(runtime)
        return runtime.wait_passing() if wait else runtime

    yield start
    processes.stop_all([runtime.proc for runtime in started])  # their drains overlap


@pytest.fixture
def three_stages(start_runtime: Callable[..., RuntimeProc]) -> list[RuntimeProc]:
    """tokenize -> count -> score (examples.trivial.models), each with its sidecar, passing."""
    runtimes = [
        start_runtime(f"examples.trivial.models:{m}", m, "v1", wait=False) for m in ("tokenize", "count", "score")
    ]
    return passing(*runtimes)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A model store of the test's own."""
    return tmp_path / "store"


@pytest.fixture
def model_plane(control_plane: ControlPlaneProc, store: Path) -> ControlPlaneProc:
    """The control plane, restarted with a model store of the test's own."""
    control_plane.stop()
    control_plane.env = {**control_plane.env, "MLLAMBDA_MODEL_STORE": str(store)}
    control_plane.extra_args = [*control_plane.extra_args, f"--packages=127.0.0.1:{processes.free_port()}"]
    control_plane.start()
    return control_plane


@pytest.fixture
def gateway(control_plane: ControlPlaneProc, start_envoy: EnvoyFactory) -> EnvoyProc:
    """The gateway Envoy; its listener is at control_plane.gateway_port once a pipeline exists."""
    from controlplane.node.sidecar import render_bootstrap

    return start_envoy(
        lambda admin_port: render_bootstrap("gateway", "gateway", control_plane.xds_addr, admin_port),
        admin_port=control_plane.gateway_admin_port,
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden", action="store_true", help="rewrite tests/golden/*.json from what translation makes now"
    )


# The longest files first (seconds on 2 cores, measured with --durations=0), so that the workers, which take
# a file each time they are free (`--dist loadfile --no-loadscope-reorder`), end together instead of one running a
# long scenario alone at the end. A file not named keeps its place after these; a stale list costs time, not
# correctness.
LONGEST_FIRST = (
    "test_formats_e2e.py",
    "test_kafka_e2e.py",
    "test_autoscale_e2e.py",
    "test_packages_e2e.py",
    "test_pipeline_e2e.py",
    "test_rollouts_e2e.py",
    "test_stack_e2e.py",
    "test_multihost.py",
    "test_consul_outage.py",
    "test_zero_loss.py",
    "test_admin.py",
    "test_prometheus.py",
    "test_kafka_poison.py",
    "test_supervision.py",
    "test_monitoring_e2e.py",
    "test_fuzz.py",
    "test_observability.py",
    "test_colocated_e2e.py",
    "test_ha.py",
    "test_replay_e2e.py",
    # Last of the long ones, beside the short files: it loads both cores for four minutes, which put a scenario
    # with a latency bound beside it over that bound (the autoscale step's p99, 329 ms against 250).
    "test_soak.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
