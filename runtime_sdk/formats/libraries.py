"""One loader per format: the saved file opened with its own library, its signature read from the library.

Each returns the model's Signature and a call that takes the inputs as arrays (rows
first, by input name) and returns the outputs by name (rows first). The library is
imported here only, in the package's environment: never the control plane's.
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime_sdk.formats.signature import Field, Signature

Arrays = dict[str, np.ndarray]


class LoadError(Exception):
    """The file cannot be served as this format; the message says why, for the build or the runtime's log."""


@dataclass(frozen=True)
class Loaded:
    signature: Signature
    call: Callable[[Arrays], dict[str, Any]]


def _datatype(dtype: Any) -> str:
    kind = np.dtype(dtype).kind
    if kind == "b":
        return "BOOL"
    if kind in "iu":
        return "INT64"
    if kind == "f":
        return "FP64" if np.dtype(dtype).itemsize == 8 else "FP32"
    return "BYTES"


def _matrix(columns: list[str] | None) -> Callable[[Arrays], Any]:
    """Column arrays (or the one `input` tensor) -> the 2-D matrix a tabular library takes."""
    if columns is None:
        return lambda arrays: arrays["input"]
    return lambda arrays: np.column_stack([arrays[name] for name in columns])


def _inputs(names: list[str] | None, count: int | None) -> tuple[tuple[Field, ...], bool]:
    if names:
        return tuple(Field(name, "FP64", (-1,)) for name in names), True
    return (Field("input", "FP64", (-1, count if count else -1)),), False


def sklearn(path: Path) -> Loaded:
    try:
        if path.suffix == ".joblib":
            import joblib

            model = joblib.load(path)
        else:
            with path.open("rb") as handle:
                model = pickle.load(handle)
    except Exception as err:  # a truncated file, a class this scikit-learn lacks, another pickle
        raise LoadError(f"{path.name}: does not load with this environment's scikit-learn: {_first(err)}") from err
    if not callable(getattr(model, "predict", None)):
        raise LoadError(f"{path.name}: holds a {type(model).__name__}, which has no predict()")
    names = [str(n) for n in getattr(model, "feature_names_in_", [])] or None
    inputs, columns = _inputs(names, getattr(model, "n_features_in_", None))
    classes = getattr(model, "classes_", None)
    label = _datatype(classes.dtype) if isinstance(classes, np.ndarray) else "FP64"
    outputs = [Field("predict", label, (-1,))]
    proba = isinstance(classes, np.ndarray) and hasattr(model, "predict_proba")
    if isinstance(classes, np.ndarray) and proba:
        outputs.append(Field("predict_proba", "FP64", (-1, len(classes))))
    matrix = _matrix(names)
    frame = _frame(names)
    if names and frame is None:  # the columns were checked by name already; a matrix is what it gets here
        warnings.filterwarnings("ignore", message="X does not have valid feature names")

    def call(arrays: Arrays) -> dict[str, Any]:
        x = frame(arrays) if frame else matrix(arrays)
        found = {"predict": model.predict(x)}
        if proba:
            found["predict_proba"] = model.predict_proba(x)
        return found

    return Loaded(Signature(inputs, tuple(outputs), columns, _sklearn_nan(model)), call)


def _frame(names: list[str] | None) -> Callable[[Arrays], Any] | None:
    """A model fitted on a DataFrame gets one (its column names checked by scikit-learn) if pandas is there."""
    if names is None:
        return None
    try:
        import pandas as pd
    except ImportError:
        return None
    return lambda arrays: pd.DataFrame({name: arrays[name] for name in names})


def _sklearn_nan(model: Any) -> bool:
    try:
        return bool(model.__sklearn_tags__().input_tags.allow_nan)
    except AttributeError:
        try:
            return bool(model._get_tags().get("allow_nan", False))
        except AttributeError:
            return False


def xgboost(path: Path) -> Loaded:
    import xgboost as xgb

    booster = xgb.Booster()
    try:
        booster.load_model(str(path))
    except xgb.core.XGBoostError as err:
        raise LoadError(f"{path.name}: not an XGBoost model this XGBoost reads: {_first(err)}") from err
    config = json.loads(booster.save_config())["learner"]
    classes = int(config["learner_model_param"].get("num_class", "0") or 0)
    objective = config["objective"]["name"]
    names = list(booster.feature_names or []) or None
    inputs, columns = _inputs(names, booster.num_features())
    shape = (-1, classes) if objective == "multi:softprob" and classes > 1 else (-1,)
    matrix = _matrix(names)

    def call(arrays: Arrays) -> dict[str, Any]:
        return {"predict": booster.predict(xgb.DMatrix(matrix(arrays), feature_names=names))}

    return Loaded(Signature(inputs, (Field("predict", "FP32", shape),), columns, allow_nan=True), call)


def lightgbm(path: Path) -> Loaded:
    import lightgbm as lgb

    try:
        booster = lgb.Booster(model_file=str(path))
    except lgb.basic.LightGBMError as err:
        raise LoadError(f"{path.name}: not a LightGBM model this LightGBM reads: {_first(err)}") from err
    names = booster.feature_name()
    if all(name == f"Column_{i}" for i, name in enumerate(names)):  # LightGBM's names for unnamed features
        names = []
    inputs, columns = _inputs(names or None, booster.num_feature())
    classes = booster._Booster__num_class if hasattr(booster, "_Booster__num_class") else 1
    matrix = _matrix(names or None)
    shape = (-1, classes) if classes > 1 else (-1,)

    def call(arrays: Arrays) -> dict[str, Any]:
        return {"predict": booster.predict(matrix(arrays))}

    return Loaded(Signature(inputs, (Field("predict", "FP64", shape),), columns, allow_nan=True), call)


ONNX_TYPES = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(int16)": "INT16",
    "tensor(int8)": "INT8",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}


def onnx(path: Path) -> Loaded:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one request's rows; replicas and batching give the parallelism
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own classes for a file that is not a graph
        raise LoadError(f"{path.name}: not an ONNX graph onnxruntime can run: {_first(err)}") from err
    inputs = []
    for node in session.get_inputs():
        if node.type not in ONNX_TYPES:
            raise LoadError(f"{path.name}: input {node.name!r} is a {node.type}: only tensor inputs are served")
        inputs.append(Field(node.name, ONNX_TYPES[node.type], _dims(node.shape)))
    outputs = [Field(n.name, ONNX_TYPES.get(n.type, "ANY"), _dims(n.shape) or (-1,)) for n in session.get_outputs()]
    names = [f.name for f in outputs]

    def call(arrays: Arrays) -> dict[str, Any]:
        return dict(zip(names, session.run(names, arrays), strict=True))

    return Loaded(Signature(tuple(inputs), tuple(outputs), columns=False, allow_nan=True), call)


def _dims(shape: Any) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (shape or []))


MLFLOW_TYPES = {
    "double": "FP64",
    "float": "FP32",
    "long": "INT64",
    "integer": "INT32",
    "boolean": "BOOL",
    "string": "BYTES",
    "binary": "BYTES",
    "datetime": "BYTES",
}


def mlflow(path: Path) -> Loaded:
    import mlflow.pyfunc
    import pandas as pd

    try:
        model = mlflow.pyfunc.load_model(str(path))
    except Exception as err:  # a flavour this environment lacks, a file that does not load
        raise LoadError(f"the MLflow model does not load as pyfunc here: {_first(err)}") from err
    schema = model.metadata.get_input_schema()
    if schema is None:
        raise LoadError("the MLflow model has no signature: save it with signature=infer_signature(X, y)")
    out_schema = model.metadata.get_output_schema()
    if schema.is_tensor_spec():
        inputs = tuple(Field(s.name or "input", _datatype(s.type), tuple(s.shape) or (-1,)) for s in schema.inputs)

        def frame(arrays: Arrays) -> Any:
            return arrays if any(s.name for s in schema.inputs) else arrays["input"]
    else:
        inputs = tuple(
            Field(c.name or f"c{i}", MLFLOW_TYPES.get(_type_name(c.type), "ANY"), (-1,))
            for i, c in enumerate(schema.inputs)
        )

        def frame(arrays: Arrays) -> Any:
            return pd.DataFrame({f.name: arrays[f.name] for f in inputs})

    outputs = _mlflow_outputs(out_schema)

    def call(arrays: Arrays) -> dict[str, Any]:
        found = model.predict(frame(arrays))
        if isinstance(found, pd.DataFrame):
            return {str(c): found[c].to_numpy() for c in found.columns}
        if isinstance(found, dict):
            return found
        return {"predictions": found}

    return Loaded(Signature(inputs, outputs, columns=not schema.is_tensor_spec(), allow_nan=False), call)


def _type_name(kind: Any) -> str:
    return str(getattr(kind, "name", kind))


def _mlflow_outputs(schema: Any) -> tuple[Field, ...]:
    if schema is None:
        return (Field("predictions", "ANY", (-1,)),)
    if schema.is_tensor_spec():
        return tuple(Field(s.name or "predictions", _datatype(s.type), tuple(s.shape) or (-1,)) for s in schema.inputs)
    named = [c for c in schema.inputs if c.name]
    if len(named) == len(schema.inputs) and len(named) > 1:
        return tuple(Field(c.name, MLFLOW_TYPES.get(_type_name(c.type), "ANY"), (-1,)) for c in named)
    return (Field("predictions", MLFLOW_TYPES.get(_type_name(schema.inputs[0].type), "ANY"), (-1,)),)


LOADERS: dict[str, Callable[[Path], Loaded]] = {
    "sklearn": sklearn,
    "xgboost": xgboost,
    "lightgbm": lightgbm,
    "onnx": onnx,
    "mlflow": mlflow,
}


def _first(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"
