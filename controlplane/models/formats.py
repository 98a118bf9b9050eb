"""Which library saved a model folder, and what its environment needs, read from the files alone.

`mllambda build DIR` on a folder without an entry of its own: an MLflow model
(`MLmodel`), an ONNX graph (`*.onnx`), a scikit-learn pickle (`*.joblib`, `*.pkl`),
an XGBoost model (`*.json` or `*.ubj` saved by `save_model`) or a LightGBM model (its
text format). The package then runs `runtime_sdk.formats` (load and predict for each
format, in the package's own environment). Requirements come from the folder's
`requirements.txt` when it has one (MLflow writes it), else from what the file says
of the library that saved it (scikit-learn and XGBoost record their version).
Nothing here imports a model library: the control plane's environment has none.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("mlflow", "onnx", "sklearn", "xgboost", "lightgbm")
ENTRY = "runtime_sdk.formats:predict"
BATCH_ENTRY = "runtime_sdk.formats:predict_batch"
LOADER = "runtime_sdk.formats:load"
HEAD = 4096  # bytes read to recognise a file
MAX_SCAN = 64 * 1024 * 1024  # bytes of a pickle or JSON model read for the version that saved it


class FormatError(Exception):
    """The folder's model cannot be told apart (several files, or none of the format asked for)."""


@dataclass(frozen=True)
class Detected:
    format: str
    model_file: str  # relative to the folder; "." for an MLflow model (the folder is the model)
    requirements: tuple[str, ...]  # inferred when the folder has no requirements.txt


def detect(root: Path, files: list[str], wanted: str = "") -> Detected | None:
    """The folder's model format (None: not a saved model; a FormatError when it is ambiguous)."""
    if wanted and wanted not in FORMATS:
        raise FormatError(f"--format {wanted}: not one of {', '.join(FORMATS)}")
    found = [(fmt, name) for name in files for fmt in [_format_of(root / name, name)] if fmt]
    if wanted:
        found = [(fmt, name) for fmt, name in found if fmt == wanted]
    if any(fmt == "mlflow" for fmt, _ in found):
        found = [("mlflow", ".")]
    if not found:
        if wanted:
            raise FormatError(f"{root}: no {wanted} model file found (expected {_expected(wanted)})")
        return None
    if len(found) > 1:
        shown = ", ".join(f"{name} ({fmt})" for fmt, name in found)
        raise FormatError(f"{root}: several model files: {shown}; keep one in the folder (or give --format)")
    fmt, name = found[0]
    return Detected(fmt, name, tuple(_requirements(fmt, root / name)))


def _expected(fmt: str) -> str:
    return {
        "mlflow": "an MLmodel file",
        "onnx": "a .onnx file",
        "sklearn": "a .joblib, .pkl or .pickle file",
        "xgboost": "a .json or .ubj file saved by XGBoost",
        "lightgbm": "a LightGBM model in its text format",
    }[fmt]


def _format_of(path: Path, name: str) -> str:
    if "/" in name:  # only the folder's top level: files below it are the model's own (an MLflow model's)
        return ""
    if name == "MLmodel":
        return "mlflow"
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".joblib", ".pkl", ".pickle"):
        return "sklearn"
    if suffix == ".ubj":
        return "xgboost"
    if suffix in (".json", ".txt", ".model", ".lgb"):
        head = _head(path)
        if suffix == ".json" and b'"learner"' in head:
            return "xgboost"
        if head.startswith(b"tree\n") and b"version=" in head:
            return "lightgbm"
    return ""


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(HEAD)
    except OSError:
        return b""


def _requirements(fmt: str, path: Path) -> list[str]:
    if fmt == "sklearn":
        version = _scan(path, rb"_sklearn_version.{0,8}?(\d+\.\d+(?:\.\d+)?(?:\.post\d+)?)")
        found = [f"scikit-learn=={version}" if version else "scikit-learn", "numpy"]
        return [*found, "joblib"] if path.suffix == ".joblib" else found
    if fmt == "xgboost":
        name = "xgboost-cpu" if platform.system() == "Linux" and platform.machine() == "x86_64" else "xgboost"
        version = _scan(path, rb'"version"\s*:\s*\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]')
        return [f"{name}=={version}" if version else name, "numpy"]
    if fmt == "lightgbm":
        return ["lightgbm", "numpy"]
    if fmt == "onnx":
        return ["onnxruntime", "numpy"]
    return []  # mlflow: its requirements.txt, always written by save_model/log_model


def _scan(path: Path, pattern: bytes) -> str:
    """The version a library wrote into its file ("" when it is not there or the file is compressed)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_SCAN)
    except OSError:
        return ""
    match = re.search(pattern, data, re.S)
    if match is None:
        return ""
    return ".".join(part.decode() for part in match.groups())


def mlflow_requirements(lines: list[str]) -> list[str]:
    """MLflow pins `mlflow`, its whole tracking server; serving a pyfunc needs only `mlflow-skinny`."""
    return [re.sub(r"^mlflow(?=\s*(==|>=|<=|~=|!=|$|\[))", "mlflow-skinny", line) for line in lines]
