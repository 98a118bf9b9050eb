"""A model server we do not run, in a pipeline: MLServer (its scikit-learn runtime) as an OIP stage
between two runtimes of ours, beside our SDK serving the same model, through real Envoys and Consul."""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.config import PROJECT_ROOT
from controlplane.node.processes import ManagedProcess, free_port, http_get
from tests.helpers.components import consul_passing
from tests.helpers.envoy import wait_for
from tests.helpers.pipelines import apply, post, until_ok

pytestmark = pytest.mark.slow
MLSERVER = PROJECT_ROOT / ".tools" / "mlserver" / "bin"
MODELS = "tests.helpers.oip_models"
CASES = {(0.3, 0.3, 0.3, 0.3): "small", (1.5, 1.5, 1.5, 1.5): "medium", (2.8, 2.8, 2.8, 2.8): "large"}


@pytest.fixture
def mlserver(tmp_path: Path, logs_dir: Path) -> Iterator[tuple[int, ManagedProcess]]:
    """MLServer serving model `iris` (trained by MLServer's own Python, the same way our runtime trains it)."""
    if not (MLSERVER / "mlserver").exists():
        pytest.fail("MLServer is not installed: `./dev test` installs it into .tools/mlserver")
    folder = tmp_path / "iris"
    folder.mkdir()
    save = f"from {MODELS} import save; save({str(folder / 'model.joblib')!r})"
    subprocess.run([str(MLSERVER / "python"), "-c", save], cwd=PROJECT_ROOT, check=True)
    settings = {
        "name": "iris",
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "v1"},
    }
    (folder / "model-settings.json").write_text(json.dumps(settings))
    port = free_port()
    server = {"http_port": port, "grpc_port": free_port(), "metrics_port": free_port(), "parallel_workers": 0}
    (folder / "settings.json").write_text(json.dumps(server))
    proc = ManagedProcess("mlserver", [str(MLSERVER / "mlserver"), "start", str(folder)], logs_dir / "mlserver.log")
    proc.start().wait_ready(lambda: http_get(f"http://127.0.0.1:{port}/v2/models/iris/ready")[0] == 200, timeout=90)
    yield port, proc
    proc.stop()


def register(control_plane: Any, consul_agent: Any, logs_dir: Path, port: int) -> ManagedProcess:
    argv = [
        sys.executable,
        "-m",
        "controlplane.cli",
        "register",
        "--model=iris",
        "--version=v1",
        f"--oip-port={port}",
        "--oip-model=iris",
        "--service-id=iris-mlserver",
        f"--consul=127.0.0.1:{consul_agent.http_port}",
        f"--xds={control_plane.xds_addr}",
    ]
    proc = ManagedProcess("register iris", argv, logs_dir / "register-iris.log").start()
    proc.wait_ready(lambda: consul_passing(consul_agent.http_port, "iris", "iris-mlserver"), timeout=30)
    return proc


async def test_mlserver_is_a_stage_beside_our_runtime_and_leaves_eds_when_not_ready(
    control_plane: Any, gateway: Any, start_runtime: Any, consul_agent: Any, logs_dir: Path, mlserver: Any
) -> None:
    port, server = mlserver
    for target, model, version in [("prepare", "prepare", "v1"), ("predict", "iris", "v2"), ("name", "namer", "v1")]:
        extra = ("--loader", f"{MODELS}:load") if target == "predict" else ()
        start_runtime(f"{MODELS}:{target}", model, version, extra=extra)
    registered = register(control_plane, consul_agent, logs_dir, port)
    apply(
        control_plane,
        Path(logs_dir),
        {
            "name": "sizes",
            "stages": [
                {"name": "prepare", "variants": [{"model": "prepare", "version": "v1"}]},
                {
                    "name": "classify",
                    "protocol": "oip",
                    "variants": [
                        {"model": "iris", "version": "v1", "weight": 50},
                        {"model": "iris", "version": "v2", "weight": 50},
                    ],
                },
                {"name": "name", "variants": [{"model": "namer", "version": "v1"}]},
            ],
        },
    )
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/sizes"
    await until_ok(url, {"features": [1, 1, 1, 1]})

    async def send(n: int) -> collections.Counter[str]:
        seen: collections.Counter[str] = collections.Counter()
        async with aiohttp.ClientSession() as session:
            for i in range(n):
                features, size = list(CASES.items())[i % len(CASES)]
                status, body, served = await post(session, url, {"features": features})
                assert status == 200 and body["size"] == size, (status, body, served)
                seen[served.split("classify=")[1].split(",")[0]] += 1
        return seen

    # Both answer the same, the split holds, and the chain names who answered.
    seen = await send(300)
    assert set(seen) == {"iris:v1", "iris:v2"} and 0.38 <= seen["iris:v1"] / 300 <= 0.62, seen

    described = control_plane.cli("describe", "pipeline", "sizes").stdout
    assert "2. classify  timeout=10000ms retries=2 protocol=oip" in described, described

    # MLServer's model stops being ready: Consul's check through the sidecar fails, EDS drops it.
    server.popen.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    await wait_for(lambda: not consul_passing(consul_agent.http_port, "iris", "iris-mlserver"), timeout=20)
    await until_ok(url, {"features": [1, 1, 1, 1]})
    await wait_for(lambda: _only_v2(url), timeout=10)
    assert await send(60) == {"iris:v2": 60}
    registered.stop()


async def _only_v2(url: str) -> bool:
    async with aiohttp.ClientSession() as session:
        results = [await post(session, url, {"features": [1, 1, 1, 1]}) for _ in range(10)]
    return all(status == 200 and "classify=iris:v2" in served for status, _, served in results)
