"""Model packages through the real stack: built and uploaded over the admin API, run in their own environments.

Two versions of one model pin different scikit-learn releases (1.5.2 and 1.9.0); they serve side by side in
one pipeline, split 50/50 by the gateway Envoy, each answering with the scikit-learn it imports, from an
environment that is not the control plane's.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.node import processes
from controlplane.stack.replicas import LocalScaler
from tests.helpers.components import ControlPlaneProc
from tests.helpers.envoy import wait_for
from tests.helpers.forms import Forms
from tests.helpers.pipelines import apply, post, until_ok

PACKAGES = Path(__file__).parent / "data" / "packages"
pytestmark = pytest.mark.slow


def package_runtime(
    start_runtime: Any, store: Path, model: str, version: str, wait: bool = True, extra: tuple[str, ...] = ()
) -> Any:
    return start_runtime("", model, version, wait=wait, extra=("--package", f"--model-store={store}", *extra))


async def test_two_scikit_learn_releases_serve_side_by_side_split_50_50(
    model_plane: ControlPlaneProc, gateway: Any, start_runtime: Any, store: Path, tmp_path: Path
) -> None:
    for folder, version in (("sk15", "v15"), ("sk19", "v19")):
        built = model_plane.cli("build", str(PACKAGES / folder), "--model=skl", f"--version={version}")
        assert built.returncode == 0, built.stderr
        assert f"model/skl:{version} built" in built.stdout
    again = model_plane.cli("build", str(PACKAGES / "sk15"), "--model=skl", "--version=v15")
    assert again.returncode == 0 and "unchanged" in again.stdout, again.stderr
    taken = model_plane.cli("build", str(PACKAGES / "sk19"), "--model=skl", "--version=v15")
    assert taken.returncode == 1 and "already holds package" in taken.stderr, taken.stderr

    listed = model_plane.cli("get", "models", "skl")
    assert [line.split()[:2] for line in listed.stdout.splitlines()[1:]] == [["skl", "v15"], ["skl", "v19"]]
    described = model_plane.cli("describe", "model", "skl:v19")
    assert "scikit-learn==1.9.0" in described.stdout and "model.py" in described.stdout, described.stderr
    assert re.search(r"Created: .* by \S+@\S+ from ipv4:127\.0\.0\.1:\d+", described.stdout), described.stdout

    package_runtime(start_runtime, store, "skl", "v15")
    package_runtime(start_runtime, store, "skl", "v19", extra=("--profile-percent=100",))
    split = [{"model": "skl", "version": "v15", "weight": 50}, {"model": "skl", "version": "v19", "weight": 50}]
    apply(model_plane, tmp_path, {"name": "sk", "stages": [{"name": "classify", "variants": split}]})
    url = f"http://127.0.0.1:{model_plane.gateway_port}/pipelines/sk"
    await until_ok(url, {"x": 3})
    seen: collections.Counter[str] = collections.Counter()
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            status, body, served = await post(session, url, {"x": 3})
            assert status == 200 and body["label"] == 1, body
            version = served.split("skl:")[1]
            assert body["sklearn"] == {"v15": "1.5.2", "v19": "1.9.0"}[version], (served, body)
            assert body["prefix"] != sys.prefix and "/envs/" in body["prefix"], body["prefix"]
            seen[version] += 1
    assert 60 <= seen["v15"] <= 140 and seen["v15"] + seen["v19"] == 200, seen
    import sklearn  # the control plane's own environment: neither release

    assert sklearn.__version__ not in ("1.5.2", "1.9.0")

    # v19's package carries its training sample: that is its drift baseline. Traffic of x=3 only drifts from it.
    based = model_plane.cli("monitor", "baseline", "skl:v19", "--reference")
    assert based.returncode == 0 and "200 records of its reference reference.jsonl" in based.stdout, based.stderr
    lacking = model_plane.cli("monitor", "baseline", "skl:v15", "--reference")
    assert lacking.returncode == 1 and "skl:v15 has no reference data" in lacking.stderr, lacking.stderr

    async def drifted() -> dict[str, Any]:
        done = await asyncio.to_thread(model_plane.cli, "monitor", "status", "skl:v19", "-o", "json")
        (row,) = json.loads(done.stdout)["items"]
        return {f"{d['side']}.{d['field']} ({d['of']})": d["psi"] for d in row["drift"]}

    psi = await wait_for(drifted, timeout=40, every=1)  # v19's windows close and are read
    assert psi["inputs.x (value)"] > 1 and psi["outputs.label (value)"] > 1, psi

    undeploy = model_plane.cli("undeploy", "skl:v15")
    assert undeploy.returncode == 1 and "not deployed" in undeploy.stderr, undeploy.stderr
    deployed = model_plane.cli("deploy", "skl:v15", "--replicas=1")
    assert deployed.returncode == 0, deployed.stderr
    refused = model_plane.cli("undeploy", "skl:v15")
    assert refused.returncode == 1 and "serves pipeline(s) sk in traffic" in refused.stderr, refused.stderr
    refused = model_plane.cli("delete", "model", "skl:v19")
    assert refused.returncode == 1 and "in traffic" in refused.stderr, refused.stderr
    forced = model_plane.cli("undeploy", "skl:v15", "--force")
    assert forced.returncode == 0, forced.stderr


async def test_a_tampered_package_never_runs_and_bad_uploads_store_nothing(
    model_plane: ControlPlaneProc, start_runtime: Any, store: Path
) -> None:
    built = model_plane.cli("build", str(PACKAGES / "bare"), "--model=echo", "--version=v1")
    assert built.returncode == 0, built.stderr
    (blob,) = (store / "sha256").glob("*.tar")
    blob.write_bytes(blob.read_bytes()[:-1024])  # truncated on disk
    runtime = package_runtime(start_runtime, store, "echo", "v1", wait=False)
    assert runtime.proc.popen is not None
    runtime.proc.popen.wait(timeout=60)
    assert "tampered or truncated" in runtime.proc.tail(), runtime.proc.tail()

    for bad, expected in (("echo:v1\n", "version"), ("../x:v1", "model")):
        model, _, version = bad.partition(":")
        result = model_plane.cli("build", str(PACKAGES / "bare"), f"--model={model}", f"--version={version}")
        assert result.returncode == 1 and expected in result.stderr, result.stderr
    missing = model_plane.cli(
        "runtime",
        "--package",
        "--model=echo",
        "--version=v9",
        f"--model-store={store}",
        f"--consul=127.0.0.1:{model_plane.consul_port}",
        f"--kv-prefix={model_plane.kv_prefix}",
    )
    assert missing.returncode == 1 and "echo:v9 not found" in missing.stderr, missing.stderr
    assert sorted(p.name for p in (store / "sha256").iterdir()) == [blob.name]  # nothing half-written


async def test_a_host_that_never_had_the_package_fetches_it_checks_it_and_keeps_it(
    model_plane: ControlPlaneProc, gateway: Any, start_runtime: Any, store: Path, tmp_path: Path
) -> None:
    built = model_plane.cli("build", str(PACKAGES / "bare"), "--model=echo", "--version=v1")
    assert built.returncode == 0, built.stderr
    elsewhere = tmp_path / "other-host-store"  # this "host" has never seen the package
    packages = next(a for a in model_plane.extra_args if a.startswith("--packages=")).split("=", 1)[1]
    lacking = start_runtime("", "echo", "v1", wait=False, extra=("--package", f"--model-store={elsewhere}"))
    assert lacking.proc.popen is not None
    lacking.proc.popen.wait(timeout=60)
    assert "--packages-from" in lacking.proc.tail(), lacking.proc.tail()  # says how to get it

    start_runtime("", "echo", "v1", extra=("--package", f"--model-store={elsewhere}", f"--packages-from={packages}"))
    (kept,) = (elsewhere / "sha256").glob("*.tar")
    assert kept.read_bytes() == next((store / "sha256").glob("*.tar")).read_bytes()
    apply(
        model_plane,
        tmp_path,
        {"name": "far", "stages": [{"name": "echo", "variants": [{"model": "echo", "version": "v1"}]}]},
    )
    _, body, served = await until_ok(f"http://127.0.0.1:{model_plane.gateway_port}/pipelines/far", {"x": 1})
    assert body["x"] == 1 and served == "echo=echo:v1" and "/envs/" in body["prefix"], (body, served)


def replica_starter(model_plane: ControlPlaneProc, store: Path, logs: Path) -> Any:
    """What `mllambda up` does for replica i of a model version that has no target: its package from the store."""

    def start(spec: Any, index: int) -> processes.ManagedProcess:
        service_id = f"{spec.model}-{spec.version}-{index}"
        argv = [
            sys.executable,
            "-m",
            "controlplane.cli",
            "runtime",
            "--package",
            f"--model-store={store}",
            f"--model={spec.model}",
            f"--version={spec.version}",
            f"--service-id={service_id}",
            f"--consul=127.0.0.1:{model_plane.consul_port}",
            f"--xds={model_plane.xds_addr}",
            "--drain-seconds=0.5",
        ]
        env = {"MLLAMBDA_RUN_DIR": model_plane.run_dir, "MLLAMBDA_KV_PREFIX": model_plane.kv_prefix}
        return processes.ManagedProcess(service_id, argv, logs / f"{service_id}.log", env=env).start()

    return start


def passing(consul_port: int, service: str) -> int:
    status, body = processes.http_get(f"http://127.0.0.1:{consul_port}/v1/health/service/{service}?passing=true")
    return len(json.loads(body)) if status == 200 else 0


async def test_deploy_starts_replicas_of_a_package_undeploy_drains_them_and_a_failing_one_backs_off(
    model_plane: ControlPlaneProc, store: Path, tmp_path: Path
) -> None:
    for folder, model in (("bare", "echo"), ("broken", "broken")):
        built = model_plane.cli("build", str(PACKAGES / folder), f"--model={model}", "--version=v1")
        assert built.returncode == 0, built.stderr
    said: list[str] = []
    starter = replica_starter(model_plane, store, tmp_path)
    scaler = LocalScaler(model_plane.consul_port, model_plane.kv_prefix.rstrip("/"), starter, said.append)
    try:
        assert model_plane.cli("deploy", "echo:v1", "--replicas=2").returncode == 0

        def follows(check: Any) -> Any:
            def step() -> bool:
                scaler.follow()
                return bool(check())

            return step

        await wait_for(follows(lambda: passing(model_plane.consul_port, "echo") == 2), timeout=90)
        assert any("deploy echo:v1: 0 -> 2 replicas" in line for line in said), said
        assert model_plane.cli("deploy", "echo:v1", "--replicas=1").returncode == 0
        await wait_for(follows(lambda: passing(model_plane.consul_port, "echo") == 1), timeout=60)
        assert model_plane.cli("undeploy", "echo:v1").returncode == 0
        await wait_for(follows(lambda: passing(model_plane.consul_port, "echo") == 0 and not scaler.leaving), 60)

        assert model_plane.cli("deploy", "broken:v1").returncode == 0
        await wait_for(follows(lambda: any("again in 2s" in line for line in said)), timeout=90)
        failed = next(line for line in said if "again in 2s" in line)
        assert "weights.bin: no such file" in failed, failed  # its own last lines, for the person who reads
        scaler.follow()
        assert scaler.versions["broken.v1"].running == {}  # not before the back-off has passed
        # ... and where someone who deployed it looks: `describe`, `get models`, the models page
        described = model_plane.cli("describe", "model", "broken:v1").stdout
        assert "Failing:      1 replica exit in a row" in described and "weights.bin: no such file" in described
        await wait_for(follows(lambda: any("again in 4s" in line for line in said)), timeout=90)  # doubled
        listed = json.loads(model_plane.cli("get", "models", "broken", "-o", "json").stdout)["items"]
        assert listed[0]["trouble"]["failures"] == 2 and "weights.bin" in listed[0]["trouble"]["tail"], listed
        assert re.search(r"^broken\s+v1\s+.*\s1 \(failing\)\s", model_plane.cli("get", "models").stdout, re.M)
        shown = model_plane.cli("status", f"--dashboard=http://127.0.0.1:{model_plane.metrics_port}").stdout
        assert re.search(r"^broken:v1\s+2\s+[\d:]+\s+\| ", shown, re.M) and "| RuntimeError: weights.bin" in shown, (
            shown
        )
        page = processes.http_get(f"http://127.0.0.1:{model_plane.metrics_port}/models")[1]
        assert "2 exits in a row; again at" in page and "weights.bin: no such file" in page, page
        assert passing(model_plane.consul_port, "echo") == 0  # the rest is untouched
        assert model_plane.cli("undeploy", "broken:v1").returncode == 0  # with it goes what its stack said
        scaler.follow()
        assert "Failing" not in model_plane.cli("describe", "model", "broken:v1").stdout
        assert (
            "DEPLOYED, FAILING"
            not in model_plane.cli("status", f"--dashboard=http://127.0.0.1:{model_plane.metrics_port}").stdout
        )
        key = f"{model_plane.kv_prefix.rstrip('/')}-deploy-trouble/broken.v1"
        assert processes.http_get(f"http://127.0.0.1:{model_plane.consul_port}/v1/kv/{key}")[0] == 404
    finally:
        for have in scaler.versions.values():
            for proc in have.running.values():
                proc.stop()
        for _, proc in scaler.leaving:
            proc.stop()


async def test_the_models_page_lists_packages_and_deploys_through_the_admin_api(
    model_plane: ControlPlaneProc, tmp_path: Path
) -> None:
    hostile = tmp_path / "hostile"
    shutil.copytree(PACKAGES / "bare", hostile)
    (hostile / "mllambda.yaml").write_text(
        "kind: Model\nentry: echo:predict\ndescription: '<script>alert(1)</script>'\n"
    )
    built = model_plane.cli("build", str(hostile), "--model=echo", "--version=v1", "--no-check")
    assert built.returncode == 0, built.stderr
    base = f"http://127.0.0.1:{model_plane.metrics_port}"
    action = "/models/echo/v1/deploy"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        async with browser.get(base + "/models") as r:
            text = await r.text()
        assert r.status == 200 and "echo:v1" in text and action not in text  # signed out: no forms
        assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
        async with browser.post(base + action, data={"replicas": "2", "csrf": ""}) as r:
            assert r.status == 403
        async with browser.post(base + "/login", data={"token": model_plane.ui_token, "name": "ada"}) as r:
            assert r.status == 200
        async with browser.get(base + "/models") as r:
            form = Forms(await r.text()).find(action)
        async with browser.post(base + action, data={**form, "replicas": "500"}) as r:
            assert r.status == 400 and "replicas: between 0 and 100" in await r.text()  # the admin API's answer
        assert deployed(model_plane) is None
        async with browser.post(base + action, data={**form, "replicas": "2"}) as r:
            text = await r.text()
        assert r.status == 200 and "echo:v1 deployed" in text and "0 passing of 2 deployed" in text
        assert deployed(model_plane) == 2
        # autoscaled from the page: the same admin call and checks as `deploy --autoscale`
        async with browser.post(base + action, data={**form, "autoscale": "1", "min": "0", "max": "3"}) as r:
            assert r.status == 400 and "at least 1 for a deploy" in await r.text()
        async with browser.post(base + action, data={**form, "autoscale": "1", "min": "1", "max": "3"}) as r:
            text = await r.text()
        assert r.status == 200 and "of 1..3 deployed (autoscaled)" in text, text[-2000:]
        assert Forms(text).find(action)["autoscale"] == "1"  # ticked as deployed
        undeploy = Forms(text).find("/models/echo/v1/undeploy")
        async with browser.post(base + "/models/echo/v1/undeploy", data=undeploy) as r:
            assert r.status == 200 and "echo:v1 undeployed" in await r.text()
        assert deployed(model_plane) is None

    # deployed with a policy: refused as a policy file's problems are, every one named, and nothing written
    for flags, said in (
        (["--autoscale", "--min=3", "--max=2", "--target-in-flight=0"], "autoscale.max_replicas: 2 is below"),
        (["--autoscale", "--min=3", "--max=2", "--target-in-flight=0"], "autoscale.target_in_flight: expected"),
        (["--autoscale", "--min=0"], "at least 1 for a deploy (scale to zero is a policy of the --autoscale file"),
        (["--autoscale", "--replicas=2"], "--replicas or --autoscale, not both"),
        (["--max=3"], "--max: only with --autoscale"),
        (["--autoscale", "--min=-1"], "--min: between 0 and 100, got -1"),
    ):
        refused = model_plane.cli("deploy", "echo:v1", *flags)
        assert refused.returncode != 0 and said in refused.stderr, (flags, refused.stderr)
    assert deployed(model_plane) is None
    done = model_plane.cli("deploy", "echo:v1", "--autoscale", "--max=3", "--target-in-flight=2")
    assert done.returncode == 0 and "autoscaled, 1 to 3 replicas at 2 in flight each" in done.stdout, done.stderr
    assert deployed(model_plane) == 1  # where a running stack starts it; the plane's autoscaler decides from there
    described = model_plane.cli("describe", "model", "echo:v1").stdout
    assert "Deployed:     autoscaled, 1 to 3 replicas at 2 in flight each" in described, described
    assert re.search(r"^echo\s+v1\s+.*\s1\.\.3\s", model_plane.cli("get", "models").stdout, re.M)
    dashboard = f"--dashboard=http://127.0.0.1:{model_plane.metrics_port}"

    def autoscaled() -> str:
        return model_plane.cli("status", dashboard).stdout

    await wait_for(lambda: re.search(r"^echo:v1\s+1\s+0\s+1\.\.3\s+[\d:]+ policy start", autoscaled(), re.M))
    assert "1..3 deployed (autoscaled)" in processes.http_get(f"{base}/models")[1]
    raised = model_plane.cli("deploy", "echo:v1", "--autoscale", "--min=6")  # --max defaults to at least --min
    assert raised.returncode == 0 and "autoscaled, 6 to 6 replicas" in raised.stdout, raised.stderr
    # a record written by hand whose policy does not read: shown (and run) as its fixed count, never an error
    key = f"{model_plane.kv_prefix.rstrip('/')}-deploy/echo.v1"
    record = json.loads(processes.http_get(f"http://127.0.0.1:{model_plane.consul_port}/v1/kv/{key}?raw")[1])
    record["autoscale"] = {"min_replicas": -3, "bogus": 1}
    url = f"http://127.0.0.1:{model_plane.consul_port}/v1/kv/{key}"
    assert processes.http_send(url, "PUT", json.dumps(record).encode()) == 200
    listed = model_plane.cli("get", "models")
    assert listed.returncode == 0 and re.search(r"^echo\s+v1\s+.*\s6\s", listed.stdout, re.M), listed
    assert "Deployed:     6 replicas" in model_plane.cli("describe", "model", "echo:v1").stdout
    assert model_plane.cli("undeploy", "echo:v1").returncode == 0


def deployed(plane: ControlPlaneProc) -> int | None:
    """Replicas in the deploy record of echo:v1 (None: no record)."""
    key = f"{plane.kv_prefix.rstrip('/')}-deploy/echo.v1"
    status, body = processes.http_get(f"http://127.0.0.1:{plane.consul_port}/v1/kv/{key}?raw")
    return int(json.loads(body)["replicas"]) if status == 200 else None


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB file system (tmpfs): the store's disk, full after one megabyte."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_or_an_unknown_version_is_refused_and_leaves_nothing_behind(
    control_plane: ControlPlaneProc, small_disk: Path, tmp_path: Path
) -> None:
    control_plane.stop()
    control_plane.env = {**control_plane.env, "MLLAMBDA_MODEL_STORE": str(small_disk)}
    control_plane.start()
    big = tmp_path / "big"
    shutil.copytree(PACKAGES / "bare", big)
    (big / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024))  # the weights do not fit
    full = control_plane.cli("build", str(big), "--model=echo", "--version=v1", "--no-check")
    assert full.returncode == 1 and "No space left on device" in full.stderr, full.stderr
    assert [p.name for p in small_disk.rglob("*") if p.is_file()] == []  # no partial file
    assert "echo" not in control_plane.cli("get", "models").stdout
    small = control_plane.cli("build", str(PACKAGES / "bare"), "--model=echo", "--version=v1", "--no-check")
    assert small.returncode == 0, small.stderr  # what fits is stored: the store serves on
    unknown = control_plane.cli("deploy", "echo:v9")
    assert unknown.returncode == 1 and "echo:v9 not found" in unknown.stderr, unknown.stderr
