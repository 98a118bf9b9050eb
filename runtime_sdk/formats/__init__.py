"""Serve a model file as its library saved it: MLflow, ONNX, scikit-learn, XGBoost, LightGBM.

A package built from such a file (`mllambda build DIR`, the format found from the
files) runs with `runtime_sdk.formats:load` as its loader and `predict` (or
`predict_batch`, with adaptive batching) as its entry; they read the format and the
file from the package's own `.mllambda/package.json` (the runtime starts in the
package's folder). `python -m runtime_sdk.formats describe FORMAT FILE` loads a file,
asks it one made-up row that fits its signature, and prints the signature as JSON: what
`mllambda build` records in the package.

A request that does not fit the signature is a 400 naming the field; one the library
itself refuses (its ValueError or TypeError) a 422 with the library's first line;
neither reaches the client as a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from runtime_sdk.errors import Rejected
from runtime_sdk.formats.libraries import LOADERS, Loaded, LoadError
from runtime_sdk.formats.signature import read_columns, read_tensors, split
from runtime_sdk.serve import ServeError

META = Path(".mllambda") / "package.json"
_model: Loaded | None = None


def open_model(format_name: str, path: Path) -> Loaded:
    if format_name not in LOADERS:
        raise LoadError(f"unknown format {format_name!r} (known: {', '.join(sorted(LOADERS))})")
    if not path.exists():
        raise LoadError(f"{path}: no such file in the package")
    return LOADERS[format_name](path)


def load() -> None:
    """The runtime's loader: the package's model file opened once, before the runtime turns ready.
    A file that does not load stops the runtime with the library's reason (ServeError: no traceback)."""
    global _model
    meta = json.loads(META.read_text())
    try:
        _model = open_model(meta["format"], Path(meta["model_file"]))
    except LoadError as err:
        raise ServeError(f"the {meta['format']} model does not load: {err}") from err


def _loaded() -> Loaded:
    if _model is None:
        load()
    assert _model is not None
    return _model


def _inputs(model: Loaded, payload: dict[str, Any]) -> tuple[dict[str, Any], int, bool]:
    read = read_columns if model.signature.columns else read_tensors
    return read(payload, model.signature)


def _call(model: Loaded, arrays: dict[str, Any]) -> dict[str, Any]:
    try:
        return model.call(arrays)
    except (ValueError, TypeError) as err:  # the library's own check of the input
        lines = str(err).strip().splitlines()
        raise Rejected(f"the model refused the input: {lines[0][:300] if lines else type(err).__name__}") from err


def predict(payload: dict[str, Any]) -> dict[str, Any]:
    model = _loaded()
    arrays, rows, single = _inputs(model, payload)
    return split(_call(model, arrays), [(rows, single)])[0]


def predict_batch(payloads: list[dict[str, Any]]) -> list[Any]:
    """Requests stacked into one library call; one that does not fit fails alone (its Rejected in its place)."""
    import numpy as np

    model = _loaded()
    read: list[tuple[dict[str, Any], int, bool] | Rejected] = []
    for payload in payloads:
        try:
            read.append(_inputs(model, payload))
        except Rejected as err:
            read.append(err)
    good = [r for r in read if not isinstance(r, Rejected)]
    if not good:
        return list(read)
    names = list(good[0][0])
    stacked = {name: np.concatenate([arrays[name] for arrays, _, _ in good]) for name in names}
    answers = iter(split(_call(model, stacked), [(rows, single) for _, rows, single in good]))
    return [r if isinstance(r, Rejected) else next(answers) for r in read]


def probe(model: Loaded) -> None:
    """One made-up row that fits the signature (zeros, empty text), through the library: a signature that
    contradicts the model fails here, at build, not on the first request."""
    payload: dict[str, Any] = {}
    for field in model.signature.inputs:
        zero: Any = "" if field.datatype == "BYTES" else False if field.datatype == "BOOL" else 0
        if model.signature.columns:
            payload[field.name] = zero
            continue
        value: Any = zero
        for size in reversed(field.shape[1:]):
            value = [value] * max(1, size)
        payload[field.name] = [value]
    arrays, rows, single = _inputs(model, payload)
    split(_call(model, arrays), [(rows, single)])


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "describe":
        print("usage: python -m runtime_sdk.formats describe FORMAT FILE", file=sys.stderr)
        return 2
    try:
        model = open_model(argv[1], Path(argv[2]))
    except LoadError as err:
        print(str(err), file=sys.stderr)
        return 1
    try:
        probe(model)
    except Exception as err:  # the library's own error, whatever its class: reported, not raised
        lines = str(err).strip().splitlines()
        reason = f"{type(err).__name__}: {lines[0][:300] if lines else ''}"
        print(f"{argv[2]}: the model does not answer a row that fits its own signature: {reason}", file=sys.stderr)
        return 1
    print(json.dumps(model.signature.to_json()))
    return 0
