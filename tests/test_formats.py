"""Saved-model formats without a stack: which library saved a folder, and the request <-> arrays mapping."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import sklearn
from sklearn.linear_model import LogisticRegression

from controlplane.models.formats import FormatError, detect, mlflow_requirements
from controlplane.models.package import PackageError, read_manifest
from runtime_sdk import Rejected
from runtime_sdk.formats import libraries, predict_batch
from runtime_sdk.formats import signature as sig
from runtime_sdk.formats.signature import Field, Signature

COLUMNS = Signature((Field("a", "FP64", (-1,)), Field("b", "INT64", (-1,))), (Field("y", "FP64", (-1,)),), True)
TENSORS = Signature((Field("x", "FP32", (-1, 2)),), (Field("y", "FP32", (-1,)),), False)


def refused(read: Any, payload: dict[str, Any], signature: Signature) -> str:
    with pytest.raises(Rejected) as caught:
        read(payload, signature)
    assert caught.value.status == 400
    return str(caught.value)


def test_columns_take_one_row_or_a_list_per_column_and_name_what_does_not_fit() -> None:
    arrays, rows, single = sig.read_columns({"a": 1.5, "b": 2, "extra": "ignored"}, COLUMNS)
    assert (rows, single) == (1, True) and arrays["a"].tolist() == [1.5] and arrays["b"].dtype == np.int64
    arrays, rows, single = sig.read_columns({"a": [1, 2.5], "b": [3, 4]}, COLUMNS)
    assert (rows, single) == (2, False) and arrays["a"].dtype == np.float64
    assert "'b': missing" in refused(sig.read_columns, {"a": 1.0}, COLUMNS)
    assert "'b', row 0: 1.5 is not a number (INT64)" in refused(sig.read_columns, {"a": 1.0, "b": 1.5}, COLUMNS)
    assert "'a', row 1: True is not" in refused(sig.read_columns, {"a": [1.0, True], "b": [1, 2]}, COLUMNS)
    assert "different numbers of rows" in refused(sig.read_columns, {"a": [1.0], "b": [1, 2]}, COLUMNS)
    assert "mix single values and lists" in refused(sig.read_columns, {"a": 1.0, "b": [1]}, COLUMNS)
    assert "no missing values" in refused(sig.read_columns, {"a": math.nan, "b": 1}, COLUMNS)
    assert "null is not" in refused(sig.read_columns, {"a": None, "b": 1}, COLUMNS)
    assert "between 1 and" in refused(sig.read_columns, {"a": [], "b": []}, COLUMNS)
    many = list(range(sig.MAX_ROWS + 1))
    assert "between 1 and" in refused(sig.read_columns, {"a": many, "b": many}, COLUMNS)
    nan_ok = Signature(COLUMNS.inputs, COLUMNS.outputs, True, allow_nan=True)
    arrays, _, _ = sig.read_columns({"a": [None, math.nan], "b": [1, 2]}, nan_ok)
    assert np.isnan(arrays["a"]).all()


def test_tensors_take_their_shape_or_one_row_without_the_first_dimension() -> None:
    arrays, rows, single = sig.read_tensors({"x": [1, 2]}, TENSORS)
    assert (rows, single) == (1, True) and arrays["x"].shape == (1, 2) and arrays["x"].dtype == np.float32
    arrays, rows, single = sig.read_tensors({"x": [[1, 2], [3, 4], [5, 6]]}, TENSORS)
    assert (rows, single) == (3, False)
    assert "shape [1, 3] does not fit [-1, 2]" in refused(sig.read_tensors, {"x": [[1, 2, 3]]}, TENSORS)
    assert "shape [1, 1, 2] does not fit" in refused(sig.read_tensors, {"x": [[[1, 2]]]}, TENSORS)
    assert "not a rectangular array" in refused(sig.read_tensors, {"x": [[1, 2], [3]]}, TENSORS)
    assert "got text" in refused(sig.read_tensors, {"x": [["a", "b"]]}, TENSORS)
    assert "NaN or infinity" in refused(sig.read_tensors, {"x": [1, math.inf]}, TENSORS)
    deep: Any = [1.0]
    for _ in range(5000):  # a hostile nesting depth: refused, not a crash
        deep = [deep]
    assert "not a rectangular array" in refused(sig.read_tensors, {"x": deep}, TENSORS)
    ints = Signature((Field("n", "INT64", (-1,)),), (), False)
    assert "expected INT64" in refused(sig.read_tensors, {"n": [1.5]}, ints)


def test_outputs_are_cut_back_per_request_and_one_row_gives_values() -> None:
    outputs = {"y": np.array([1.0, 2.0, 3.0]), "p": np.array([[0.1, 0.9], [0.5, 0.5], [1.0, 0.0]])}
    first, second = sig.split(outputs, [(1, True), (2, False)])
    assert first == {"y": 1.0, "p": [0.1, 0.9]} and second == {"y": [2.0, 3.0], "p": [[0.5, 0.5], [1.0, 0.0]]}
    with pytest.raises(RuntimeError, match="3 rows for 2 input rows"):
        sig.split(outputs, [(2, False)])


def test_a_scikit_learn_pickle_is_served_and_a_batch_keeps_errors_per_request(tmp_path: Path) -> None:
    x = np.array([[0.0, 1.0], [1.0, 0.0], [0.2, 0.9], [0.9, 0.1]])
    model = LogisticRegression().fit(x, [0, 1, 0, 1])
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(model))
    loaded = libraries.sklearn(path)
    assert [f.to_json() for f in loaded.signature.inputs] == [{"name": "input", "datatype": "FP64", "shape": [-1, 2]}]
    assert [f.name for f in loaded.signature.outputs] == ["predict", "predict_proba"]
    import runtime_sdk.formats as formats

    formats._model = loaded
    try:
        answers = predict_batch([{"input": [0.0, 1.0]}, {"input": [[1, 2, 3]]}, {"input": [[1.0, 0.0], [0, 1]]}])
    finally:
        formats._model = None
    assert answers[0]["predict"] == model.predict(x[:1])[0]
    assert isinstance(answers[1], Rejected) and "does not fit" in str(answers[1])
    assert answers[2]["predict"] == model.predict(np.array([[1.0, 0.0], [0, 1]])).tolist()
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(libraries.LoadError, match="does not load with this environment's scikit-learn"):
        libraries.sklearn(path)


def test_the_folder_tells_its_format_and_the_version_that_saved_it(tmp_path: Path) -> None:
    model = LogisticRegression().fit([[0.0], [1.0]], [0, 1])
    joblib.dump(model, tmp_path / "model.joblib")
    found = detect(tmp_path, ["model.joblib"])
    assert found is not None and found.format == "sklearn" and found.model_file == "model.joblib"
    assert found.requirements == (f"scikit-learn=={sklearn.__version__}", "numpy", "joblib")
    (tmp_path / "model.txt").write_text("tree\nversion=v4\nnum_class=1\n")
    with pytest.raises(FormatError, match=r"several model files: model.joblib \(sklearn\), model.txt \(lightgbm\)"):
        detect(tmp_path, ["model.joblib", "model.txt"])
    picked = detect(tmp_path, ["model.joblib", "model.txt"], "lightgbm")
    assert picked is not None and picked.requirements == ("lightgbm", "numpy")
    (tmp_path / "xgb.json").write_text('{"learner": {}, "version": [3, 2, 0]}')
    found = detect(tmp_path, ["xgb.json"])
    assert found is not None and found.format == "xgboost" and found.requirements[0].endswith("==3.2.0")
    assert detect(tmp_path, ["notes.json"]) is None
    with pytest.raises(FormatError, match="no onnx model file found"):
        detect(tmp_path, ["model.joblib"], "onnx")
    with pytest.raises(FormatError, match="not one of"):
        detect(tmp_path, ["model.joblib"], "pytorch")
    assert mlflow_requirements(["mlflow==3.18.0", "mlflow-skinny", "mlflowx==1", "pandas"]) == [
        "mlflow-skinny==3.18.0",
        "mlflow-skinny",
        "mlflowx==1",
        "pandas",
    ]


def test_a_folder_with_a_saved_model_needs_no_manifest_and_one_without_says_what_it_needs(tmp_path: Path) -> None:
    joblib.dump(LogisticRegression().fit([[0.0], [1.0]], [0, 1]), tmp_path / "model.joblib")
    meta, requirements = read_manifest(tmp_path)
    assert (meta.format, meta.entry) == ("sklearn", "runtime_sdk.formats:predict")
    assert meta.loader == "runtime_sdk.formats:load"
    assert requirements[0].startswith("scikit-learn==")
    (tmp_path / "requirements.txt").write_text("scikit-learn==1.5.2\nnumpy<2\n")
    assert read_manifest(tmp_path)[1] == ["scikit-learn==1.5.2", "numpy<2"]  # the user's pins win
    (tmp_path / "model.joblib").unlink()
    with pytest.raises(PackageError, match="a model file saved by its library"):
        read_manifest(tmp_path)
