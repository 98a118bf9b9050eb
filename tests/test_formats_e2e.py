"""Models as their libraries saved them, served with no code of ours around them, through the real stack.

A training script (examples/formats/train.py) saves one model per format in an environment of its own
(scikit-learn with joblib, ONNX from skl2onnx, XGBoost and LightGBM boosters, MLflow's save_model) and
writes what each library predicts for a few rows. Each folder is built as it is (`mllambda build DIR`),
deployed as a runtime in the package's own environment, and called through the gateway Envoy with plain
JSON and with Triton's OIP client: the answers equal the library's own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import yaml

from examples.formats.saved import train
from tests.helpers.components import ControlPlaneProc, consul_passing
from tests.helpers.envoy import get_json, wait_for
from tests.helpers.pipelines import apply, post, until_ok

FORMATS = ("sklearn", "onnx", "xgboost", "lightgbm", "mlflow")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each format's model, trained and saved by its own library in a training environment (not ours)."""
    return train(tmp_path_factory.mktemp("saved"))


def expected(saved: Path, fmt: str) -> dict[str, Any]:
    return dict(json.loads((saved / f"{fmt}.expected.json").read_text()))


def close(got: Any, want: Any) -> bool:
    return bool(np.allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float), rtol=1e-5, atol=1e-6))


def infer_with_triton(port: int, model: str, columns: dict[str, list[Any]], dtype: str) -> dict[str, np.ndarray]:
    """One OIP request through the gateway with Triton's client (binary tensors, its default); outputs by name."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
    about = client.get_model_metadata(model)  # the model's own names, types and shapes
    assert [(i["name"], i["datatype"]) for i in about["inputs"]] == [(n, dtype) for n in columns], about
    inputs = []
    for name, values in columns.items():
        array = np.asarray(values, dtype=np.float32 if dtype == "FP32" else np.float64)
        tensor = triton.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer(model, inputs)
    found = {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}
    client.close()
    return found


async def _described(url: str) -> bool:
    """The gateway's OIP metadata names the model's inputs (once the control plane read its signature)."""
    _, about = await get_json(url)
    return bool(about["inputs"])


def build_all(plane: ControlPlaneProc, saved: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(FORMATS)) as pool:
        futures = {
            f: pool.submit(plane.cli, "build", str(saved / f), f"--model=f-{f}", "--version=v1", timeout=300)
            for f in FORMATS
        }
        return {f: future.result() for f, future in futures.items()}


async def test_each_format_answers_as_its_library_over_json_and_oip(
    model_plane: ControlPlaneProc,
    gateway: Any,
    start_runtime: Any,
    consul_agent: Any,
    store: Path,
    saved: Path,
    tmp_path: Path,
) -> None:
    for fmt, built in build_all(model_plane, saved).items():
        assert built.returncode == 0, (fmt, built.stderr)
        assert f"format {fmt}" in built.stderr and f"model/f-{fmt}:v1 built" in built.stdout, built.stderr
    described = model_plane.cli("describe", "model", "f-sklearn:v1").stdout
    assert "Format:       sklearn" in described and "petal width (cm)  FP64 [-1]" in described, described
    assert "predict_proba  FP64 [-1, 3]" in described and "scikit-learn==1.9.1" in described, described
    onnx_about = model_plane.cli("describe", "model", "f-onnx:v1").stdout
    assert "predict_proba  FP32 [-1, 3]" in onnx_about and "onnxruntime==" in onnx_about, onnx_about
    mlflow_about = model_plane.cli("describe", "model", "f-mlflow:v1").stdout
    assert "mlflow-skinny==3.18.0" in mlflow_about and "sepal length (cm)  FP64 [-1]" in mlflow_about, mlflow_about

    runtimes = [
        start_runtime("", f"f-{f}", "v1", wait=False, extra=("--package", f"--model-store={store}")) for f in FORMATS
    ]
    for runtime in runtimes:
        runtime.proc.wait_ready(lambda r=runtime: consul_passing(consul_agent.http_port, r.model, r.service_id), 120)
    for fmt in FORMATS:
        apply(
            model_plane,
            tmp_path,
            {"name": fmt, "stages": [{"name": "m", "variants": [{"model": f"f-{fmt}", "version": "v1"}]}]},
        )
    port = model_plane.gateway_port

    async with aiohttp.ClientSession() as session:
        for fmt in FORMATS:
            want = expected(saved, fmt)
            rows = want.pop("rows")
            columns = rows if isinstance(rows, dict) else {"predict_proba" if fmt == "onnx" else "input": rows}
            url = f"http://127.0.0.1:{port}/pipelines/{fmt}"
            status, body, _ = await until_ok(url, columns, timeout=30)
            await wait_for(lambda u=f"http://127.0.0.1:{port}/v2/models/{fmt}": _described(u), timeout=40)
            for output, values in want.items():  # every row at once: lists, one value per row
                assert close(body[output], values), (fmt, output, body, values)
            one = {name: value[0] for name, value in columns.items()}
            status, body, served = await post(session, url, one)  # one row: one value per output
            assert status == 200 and f"m=f-{fmt}:v1" in served, (fmt, status, body)
            for output, values in want.items():
                assert close(body[output], values[0]), (fmt, output, body, values[0])
            dtype = "FP32" if fmt == "onnx" else "FP64"
            answered = infer_with_triton(port, fmt, columns, dtype)
            for output, values in want.items():
                assert close(answered[output], values), (fmt, output, answered, values)

        # Requests that do not fit the signature: a 400 naming the field, and the model never sees them.
        sk = f"http://127.0.0.1:{port}/pipelines/sklearn"
        row = {name: values[0] for name, values in expected(saved, "sklearn")["rows"].items()}
        missing = {k: v for k, v in row.items() if k != "petal width (cm)"}
        for payload, words in (
            (missing, ["'petal width (cm)'", "missing"]),
            ({**row, "sepal length (cm)": "long"}, ["'sepal length (cm)'", "'long' is not a number"]),
            ({**row, "sepal length (cm)": math.nan}, ["'sepal length (cm)'", "no missing values"]),
            ({**row, "sepal width (cm)": [1.0, 2.0]}, ["mix single values and lists"]),
        ):
            status, body, _ = await post(session, sk, payload)
            assert status == 400 and all(w in body["error"] for w in words), (payload, status, body)
        onnx_url = f"http://127.0.0.1:{port}/pipelines/onnx"
        for payload, words in (
            ({"predict_proba": [[0.5, 0.5]]}, ["shape [1, 2] does not fit [-1, 3]"]),
            ({"predict_proba": [[0.5, "a", 0.1]]}, ["'predict_proba'", "expected FP32"]),
            ({"predict_proba": [[0.5], [0.1, 0.2, 0.3]]}, ["not a rectangular array"]),
        ):
            status, body, _ = await post(session, onnx_url, payload)
            assert status == 400 and all(w in body["error"] for w in words), (payload, status, body)
        # XGBoost takes missing values: NaN is a missing feature, not an error.
        xrow = {name: values[0] for name, values in expected(saved, "xgboost")["rows"].items()}
        status, body, _ = await post(
            session, f"http://127.0.0.1:{port}/pipelines/xgboost", {**xrow, "sepal width (cm)": None}
        )
        assert status == 200 and len(body["predict"]) == 3, body
        status, body, _ = await post(session, f"http://127.0.0.1:{port}/pipelines/mlflow", {"x": 1})
        assert status == 400 and "'sepal length (cm)': missing" in body["error"], body
    for runtime in runtimes:
        assert runtime.proc.alive(), runtime.proc.tail()


def test_files_that_do_not_load_are_refused_at_build_with_the_reason(
    model_plane: ControlPlaneProc, start_runtime: Any, store: Path, saved: Path, tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "model.joblib").write_bytes((saved / "sklearn" / "model.joblib").read_bytes()[:300])
    (truncated / "requirements.txt").write_text("scikit-learn==1.9.1\nnumpy\njoblib\n")
    not_a_graph = tmp_path / "not-a-graph"
    not_a_graph.mkdir()
    (not_a_graph / "model.onnx").write_text("this is not a graph\n")
    two = tmp_path / "two"
    shutil.copytree(saved / "sklearn", two)
    shutil.copy(saved / "onnx" / "model.onnx", two / "model.onnx")
    flavour = tmp_path / "flavour"
    shutil.copytree(saved / "mlflow", flavour)
    text = (flavour / "MLmodel").read_text().replace("loader_module: mlflow.sklearn", "loader_module: mlflow.nothing")
    (flavour / "MLmodel").write_text(text)
    contradicts = tmp_path / "contradicts"  # a signature of three columns for a forest fitted on four
    shutil.copytree(saved / "mlflow", contradicts)
    mlmodel = yaml.safe_load((contradicts / "MLmodel").read_text())
    mlmodel["signature"]["inputs"] = json.dumps(json.loads(mlmodel["signature"]["inputs"])[:3])
    (contradicts / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no model here\n")
    for folder, words in (
        (truncated, ["model.joblib", "does not load", "scikit-learn"]),
        (not_a_graph, ["model.onnx", "not an ONNX graph"]),
        (two, ["several model files", "model.joblib (sklearn)", "model.onnx (onnx)"]),
        (flavour, ["does not load as pyfunc", "mlflow.nothing"]),
        (contradicts, ["does not answer a row that fits its own signature", "feature names should match"]),
        (empty, ["mllambda.yaml: missing", "a model file saved by its library"]),
    ):
        result = model_plane.cli("build", str(folder), "--model=bad", "--version=v1")
        assert result.returncode == 1 and all(w in result.stderr for w in words), (folder.name, result.stderr)
    picked = model_plane.cli("build", str(two), "--model=two", "--version=v1", "--format=onnx")
    assert picked.returncode == 0 and "format onnx (model.onnx)" in picked.stderr, picked.stderr
    assert model_plane.cli("get", "models", "bad").stdout.count("bad") == 0

    # Built without the check, the runtime stops at start with the library's reason, not a traceback.
    unchecked = model_plane.cli("build", str(truncated), "--model=broken", "--version=v1", "--no-check")
    assert unchecked.returncode == 0, unchecked.stderr
    runtime = start_runtime("", "broken", "v1", wait=False, extra=("--package", f"--model-store={store}"))
    assert runtime.proc.popen is not None
    runtime.proc.popen.wait(timeout=120)
    tail = runtime.proc.tail(40)
    assert "the sklearn model does not load: model.joblib" in tail and "Traceback" not in tail, tail


async def test_a_pipeline_of_saved_models_splits_90_10_and_rolls_its_second_stage_out(
    model_plane: ControlPlaneProc,
    gateway: Any,
    start_runtime: Any,
    consul_agent: Any,
    store: Path,
    saved: Path,
    tmp_path: Path,
) -> None:
    """scikit-learn (joblib) answers predict_proba; an ONNX graph whose input is named predict_proba takes it on."""
    folders = {
        ("f-sk", "v1"): "sklearn",
        ("f-sk", "v2"): "sklearn-b",
        ("f-onnx", "v1"): "onnx",
        ("f-onnx", "v2"): "onnx-b",
    }
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        built = [
            pool.submit(model_plane.cli, "build", str(saved / folder), f"--model={m}", f"--version={v}", timeout=300)
            for (m, v), folder in folders.items()
        ]
        assert all(b.result().returncode == 0 for b in built), [b.result().stderr for b in built]
    runtimes = [
        start_runtime("", m, v, wait=False, extra=("--package", f"--model-store={store}", "--max-batch=16"))
        for m, v in folders
    ]
    for runtime in runtimes:
        runtime.proc.wait_ready(lambda r=runtime: consul_passing(consul_agent.http_port, r.model, r.service_id), 120)
    split = [{"model": "f-sk", "version": "v1", "weight": 90}, {"model": "f-sk", "version": "v2", "weight": 10}]
    rollout = {
        "candidate": {"model": "f-onnx", "version": "v2"},
        "steps": [50, 100],
        "step_seconds": 3,
        "min_requests": 10,
        "max_error_rate": 0.02,
        "max_p99_ratio": 10.0,  # the same small graph: only the host's noise could differ
    }
    stages = [
        {"name": "classify", "variants": split},
        {"name": "sure", "variants": [{"model": "f-onnx", "version": "v1"}], "rollout": rollout},
    ]
    want = json.loads((saved / "chains.expected.json").read_text())
    url = f"http://127.0.0.1:{model_plane.gateway_port}/pipelines/mixed"
    apply(model_plane, tmp_path, {"name": "mixed", "stages": stages})
    await until_ok(url, want["row"], timeout=30)
    seen: dict[str, int] = {}
    causes: list[str] = []
    async with aiohttp.ClientSession() as session:
        deadline = asyncio.get_running_loop().time() + 90
        while asyncio.get_running_loop().time() < deadline and not any("promoted" in c for c in causes):
            for _ in range(40):
                status, body, served = await post(session, url, want["row"])
                assert status == 200, (status, body, served)
                chain = served.replace("classify=f-sk:", "").replace("sure=f-onnx:", "").replace(", ", ">")
                assert body["label"] == want["chains"][chain]["label"], (chain, body)
                assert close(body["probabilities"], want["chains"][chain]["probabilities"]), (chain, body)
                seen[chain] = seen.get(chain, 0) + 1
            history = json.loads(model_plane.cli("history", "pipeline", "mixed", "-o", "json").stdout)
            causes = [v["cause"] for v in (history["items"] if isinstance(history, dict) else history)]
    assert causes[-1] == "rollout mixed/sure f-onnx:v2 promoted", causes
    total = sum(seen.values())
    second = sum(n for chain, n in seen.items() if chain.startswith("v2>"))
    assert 0.03 <= second / total <= 0.2, seen  # stage 1's 90/10 split, through the rollout of stage 2
    assert seen.get("v1>v2", 0) + seen.get("v2>v2", 0) > 0, seen
