"""Three hosts (network namespaces on a private subnet): a 3-server Consul cluster, two control planes,
one model version on two hosts, the gateway on the third; then a control plane host cut off, and
separately a runtime host killed, under steady load. Everything talks over the hosts' own addresses
with mTLS; each host's Consul server is also its local agent."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.config import PROJECT_ROOT
from controlplane.node.tools import find_consul
from tests.helpers.netns import Hosts, unavailable

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "controlplane.cli"]
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
PACKAGE = Path(__file__).parent / "data" / "packages" / "bare"


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    why = unavailable()
    if why is not None:
        pytest.skip(f"the multi-host test needs network namespaces: {why}")
    found = Hosts(3).open()
    try:
        yield found
    finally:
        found.close()


def until(what: str, check: Callable[[], bool], timeout: float = 60) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout:g} s")


def consul_get(hosts: Hosts, host: int, path: str) -> str:
    return hosts.run(host, ["curl", "-s", "-m", "2", f"http://127.0.0.1:8500{path}"]).stdout


def leader_elsewhere(hosts: Hosts, asked: int, gone: int) -> Callable[[], bool]:
    """The Consul servers that remain have elected one of themselves (a follower may still name the lost one)."""

    def check() -> bool:
        leader = consul_get(hosts, asked, "/v1/status/leader")
        return '"10.' in leader and f'"{hosts.ips[gone]}:' not in leader

    return check


def served(hosts: Hosts, name: str = "far") -> str:
    """What answers one request through the gateway on host 2 (its x-mll-served; "" if none did)."""
    url = f"http://127.0.0.1:18080/pipelines/{name}"
    done = hosts.run(
        2,
        [
            "curl",
            "-s",
            "-m",
            "2",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-XPOST",
            "-H",
            "content-type: application/json",
            "-d",
            '{"x": 1}',
            url,
        ],
    )
    return next(
        (
            line.split(":", 1)[1].strip()
            for line in done.stdout.splitlines()
            if line.lower().startswith("x-mll-served:")
        ),
        "",
    )


def pipeline(folder: Path, stages: list[str]) -> Path:
    path = folder / f"far-{len(stages)}.yaml"
    spec = {
        "name": "far",
        "transport": "http",
        "stages": [{"name": s, "variants": [{"model": "echo", "version": "v1"}]} for s in stages],
    }
    path.write_text(json.dumps(spec))
    return path


def under_load(hosts: Hosts, folder: Path, name: str, seconds: float, event: Callable[[], None]) -> dict[str, Any]:
    """Steady load from the gateway's host while `event` happens 5 s in; what the clients saw."""
    out = folder / f"{name}.json"
    argv = [
        sys.executable,
        "-m",
        "tests.helpers.multihost_load",
        "http://127.0.0.1:18080/pipelines/far",
        str(seconds),
        str(out),
    ]
    load = hosts.start(2, f"load-{name}", argv, folder / f"load-{name}.log", env={"PYTHONPATH": str(PROJECT_ROOT)})
    time.sleep(5)  # load duration before the event
    event()
    assert load.popen is not None
    load.popen.wait(timeout=seconds + 30)
    outcomes = json.loads(out.read_text())
    failed = [t for t, code, _ in outcomes if code != 200]
    last = max(t for t, _, _ in outcomes)
    return {
        "requests": len(outcomes),
        "failed": len(failed),
        "failed_at_seconds": failed,  # the event happened at 5 s
        "answered_in_last_5s": sum(1 for t, code, _ in outcomes if code == 200 and t > last - 5),
    }


def test_three_hosts_keep_answering_when_a_control_plane_host_is_cut_off_and_a_runtime_host_dies(
    hosts: Hosts, tmp_path: Path
) -> None:
    consul, xds = str(find_consul()), ",".join(f"{ip}:18000" for ip in hosts.ips[:2])
    for i in range(3):
        joins = [f"-retry-join={ip}" for j, ip in enumerate(hosts.ips) if j != i]
        argv = [
            consul,
            "agent",
            "-server",
            "-bootstrap-expect=3",
            f"-bind={hosts.ips[i]}",
            "-client=127.0.0.1",
            f"-data-dir={tmp_path}/consul{i}",
            f"-node=host{i}",
            "-dns-port=-1",
            "-log-level=warn",
            "-hcl",
            "connect { enabled = true }",
            "-hcl",
            'autopilot { server_stabilization_time = "3s" }',
            *joins,
        ]
        hosts.start(i, f"consul{i}", argv, tmp_path / f"consul{i}.log")
    until("a Consul leader", lambda: '"10.' in consul_get(hosts, 0, "/v1/status/leader"))
    until("the Connect CA", lambda: "RootCert" in consul_get(hosts, 2, "/v1/agent/connect/ca/roots"))
    for i in range(2):
        hosts.start(
            i,
            f"controlplane{i}",
            [
                *CLI,
                "controlplane",
                f"--xds={hosts.ips[i]}:18000",
                "--admin=127.0.0.1:18001",
                "--consul=127.0.0.1:8500",
                "--security=mtls",
                "--gateway-port=18080",
                "--gateway-admin-port=19000",
                "--metrics-port=18002",
                f"--gateway-tls-dir={tmp_path}/gateway-tls",
                f"--packages={hosts.ips[i]}:18004",
                f"--model-store={tmp_path}/store{i}",
            ],
            tmp_path / f"controlplane{i}.log",
        )
        run_dir = tmp_path / f"run{i}"
        run_dir.mkdir()
        hosts.start(
            i,
            f"runtime{i}",
            [
                *CLI,
                "runtime",
                "examples.trivial.models:echo",
                "--model=echo",
                "--version=v1",
                f"--service-id=echo-host{i}",
                f"--xds={xds}",
                "--consul=127.0.0.1:8500",
                "--security=mtls",
                f"--advertise-address={hosts.ips[i]}",
            ],
            tmp_path / f"runtime{i}.log",
            env={"MLLAMBDA_RUN_DIR": str(run_dir)},
        )
    hosts.start(
        2,
        "gateway",
        [
            *CLI,
            "sidecar",
            "--node-id=gateway",
            "--cluster=gateway",
            f"--xds={xds}",
            "--admin-port=19000",
            f"--config-dir={tmp_path}",
            "--security=mtls",
            "--consul=127.0.0.1:8500",
        ],
        tmp_path / "gateway.log",
    )
    passing = "/v1/health/service/echo?passing=true"
    until("both runtimes passing", lambda: consul_get(hosts, 2, passing).count('"ServiceID":"echo-host') == 2, 90)
    applied = hosts.run(0, [*CLI, "apply", "-f", str(pipeline(tmp_path, ["echo"])), "--server=127.0.0.1:18001"])
    assert "pipeline/far created (version 1)" in applied.stdout, applied.stderr
    until("the gateway answering", lambda: served(hosts) == "echo=echo:v1")
    report: dict[str, Any] = {}

    # 0. A model package built against control plane 0 is deployed on host 2, which never had it: fetched from
    # host 0 over mTLS as the model's identity, checked against its digest in Consul, kept, served.
    built = hosts.run(0, [*CLI, "build", str(PACKAGE), "--model=parcel", "--version=v1", "--server=127.0.0.1:18001"])
    assert "model/parcel:v1 built" in built.stdout, built.stderr
    parcel_env = {"MLLAMBDA_RUN_DIR": str(tmp_path / "run2"), "MLLAMBDA_CACHE_DIR": str(tmp_path / "cache2")}
    hosts.start(
        2,
        "parcel",
        [
            *CLI,
            "runtime",
            "--package",
            "--model=parcel",
            "--version=v1",
            f"--xds={xds}",
            "--service-id=parcel-host2",
            "--consul=127.0.0.1:8500",
            "--security=mtls",
            f"--advertise-address={hosts.ips[2]}",
            f"--model-store={tmp_path}/store2",
            f"--packages-from={hosts.ips[0]}:18004",
            "--profile-percent=100",
        ],
        tmp_path / "parcel.log",
        env=parcel_env,
    )
    parcel = tmp_path / "parcel.yaml"
    stage = {"name": "echo", "variants": [{"model": "parcel", "version": "v1"}]}
    parcel.write_text(json.dumps({"name": "parcel", "stages": [stage]}))
    applied = hosts.run(0, [*CLI, "apply", "-f", str(parcel), "--server=127.0.0.1:18001"])
    assert "pipeline/parcel created" in applied.stdout, applied.stderr
    report["package_fetched_and_serving_s"] = until(
        "the package served on host 2", lambda: served(hosts, "parcel") == "echo=parcel:v1", 120
    )
    (kept,) = (tmp_path / "store2" / "sha256").glob("*.tar")
    assert kept.read_bytes() == (tmp_path / "store0" / "sha256" / kept.name).read_bytes()

    # Model monitoring on control plane 0 reads the parcel runtime's profiles on host 2 through that sidecar's
    # ingress (mTLS, admitted for the control plane's identity only): the requests it answered are profiled there.
    def profiled() -> bool:
        served(hosts, "parcel")
        done = hosts.run(0, [*CLI, "monitor", "status", "parcel:v1", "-o", "json", "--server=127.0.0.1:18001"])
        rows = json.loads(done.stdout or '{"items": []}')["items"]
        return bool(rows) and rows[0]["requests"] > 0

    report["profiles_read_from_host_2_s"] = until("parcel:v1 profiled, read by control plane 0", profiled, 60)

    # 1. Host 0 (control plane 0, a runtime, a Consul server) loses its link; its processes live on.
    def cut() -> None:
        hosts.link(0, up=False)
        report["quorum_after_cut_s"] = until("a leader without host 0", leader_elsewhere(hosts, 2, gone=0))
        two = pipeline(tmp_path, ["echo", "again"])
        applied = hosts.run(1, [*CLI, "apply", "-f", str(two), "--server=127.0.0.1:18001"])  # through control plane 1
        assert "created (version 2)" in applied.stdout, applied.stderr
        report["config_from_the_other_control_plane_s"] = until(
            "version 2 at the gateway", lambda: served(hosts) == "echo=echo:v1, again=echo:v1", 60
        )

    report["cut"] = under_load(hosts, tmp_path, "cut", 30, cut)
    hosts.link(0, up=True)
    # Autopilot took host 0 out of the voters while it was gone, and makes it one again only after it has been
    # stable for a while (3 s here, 10 s by default): until then, losing another server would lose the quorum.
    # Host 0's agent would find the others again by itself within Serf's 30 s reconnect interval; an operator's
    # `consul join` says so at once. Over 90 s once, while other suites loaded both cores, hence the long bound
    # (it waits, asserts nothing).
    hosts.run(0, [consul, "join", *hosts.ips[1:]])
    tolerant = '"FailureTolerance":1'
    report["voters_again_s"] = until(
        "one failure tolerated again", lambda: tolerant in consul_get(hosts, 2, "/v1/operator/autopilot/health"), 180
    )
    until("both runtimes passing again", lambda: consul_get(hosts, 2, passing).count('"ServiceID":"echo-host') == 2, 90)

    # 2. A runtime host (a control plane, a runtime, a Consul server) dies: every process, SIGKILL. The one
    # that leads Consul if either does, so that the servers left must elect a leader while the load runs.
    leader = consul_get(hosts, 2, "/v1/status/leader")
    dead = 0 if f'"{hosts.ips[0]}:' in leader else 1
    alive = 1 - dead
    report["killed_host_led_consul"] = f'"{hosts.ips[dead]}:' in leader

    def kill() -> None:
        hosts.kill(dead)
        report["quorum_after_kill_s"] = until("a leader after the kill", leader_elsewhere(hosts, alive, gone=dead))
        one = pipeline(tmp_path, ["echo"])
        applied = hosts.run(
            alive, [*CLI, "apply", "-f", str(one), "--server=127.0.0.1:18001"]
        )  # the control plane left
        assert "created (version 3)" in applied.stdout, applied.stderr
        report["config_after_kill_s"] = until("version 3 at the gateway", lambda: served(hosts) == "echo=echo:v1", 60)

    report["kill"] = under_load(hosts, tmp_path, "kill", 40, kill)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "multihost.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items()}, indent=2))
    for scenario in ("cut", "kill"):
        assert report[scenario]["answered_in_last_5s"] >= 20, report  # it kept answering
    assert report["cut"]["failed"] <= 0.02 * report["cut"]["requests"], report
    # Once the Consul servers left have a leader again, nothing fails. During that election one run of
    # several saw every request fail (deploy/README.md, "Not yet right"): counted in the report, not hidden.
    settled = 5 + report["quorum_after_kill_s"] + 5
    assert [t for t in report["kill"]["failed_at_seconds"] if t > settled] == [], report
