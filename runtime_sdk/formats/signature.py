"""A saved model's inputs and outputs, and the JSON object <-> arrays mapping they define.

Two kinds of input (docs/architecture.md, "Model formats", has the table):
- **columns**: a table whose columns have names (scikit-learn's `feature_names_in_`,
  an MLflow column signature, a booster's feature names). Each column is a field of the
  request: a scalar for one row, or a list with one value per row (every column as long).
- **tensors**: named arrays (ONNX inputs, an MLflow tensor signature, or one `input`
  of shape [-1, n] for a model that knows only how many features it takes). Each is a
  field holding nested lists of the input's shape; without the first (row) dimension,
  the field is one row.

A request that does not fit is refused (`Rejected`, 400) naming the field and what was
expected; fields that are not inputs are ignored (a pipeline's payload carries more).
The answer has one field per output: one value for a one-row request, a list of rows
otherwise. Needs numpy (every format's environment has it); imported only by formats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime_sdk.errors import Rejected

# OIP datatypes <-> numpy; ANY: whatever JSON holds (an output the library describes no further)
NUMPY = {
    "BOOL": "bool",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BYTES": "object",
}
MAX_ROWS = 100_000


@dataclass(frozen=True)
class Field:
    name: str
    datatype: str  # OIP's (FP32, INT64, BYTES, ...), or ANY
    shape: tuple[int, ...]  # -1: any size; the first dimension is the row

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def expected(self) -> str:
        return f"{self.datatype} of shape {list(self.shape)}"


@dataclass(frozen=True)
class Signature:
    inputs: tuple[Field, ...]
    outputs: tuple[Field, ...]
    columns: bool  # inputs are a table's columns, else tensors
    allow_nan: bool = False  # the model takes missing values (NaN, null)

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [f.to_json() for f in self.inputs],
            "outputs": [f.to_json() for f in self.outputs],
            "kind": "columns" if self.columns else "tensors",
            "allow_nan": self.allow_nan,
        }


def bad(message: str) -> Rejected:
    return Rejected(message, status=400)


def read_columns(payload: dict[str, Any], signature: Signature) -> tuple[dict[str, np.ndarray], int, bool]:
    """Columns -> one array per column, the number of rows, and whether the request was one row."""
    arrays: dict[str, np.ndarray] = {}
    rows: set[int] = set()
    singles: set[bool] = set()
    for field in signature.inputs:
        if field.name not in payload:
            raise bad(f"field {field.name!r}: missing; expected {_kind(field)} (one value, or a list with one per row)")
        value = payload[field.name]
        single = not isinstance(value, list)
        values = [value] if single else value
        singles.add(single)
        rows.add(len(values))
        arrays[field.name] = _column(field, values, signature.allow_nan)
    if len(singles) > 1:
        raise bad("the columns mix single values and lists: give one value per column, or a list for each")
    if len(rows) > 1:
        raise bad(f"the columns have different numbers of rows: {sorted(rows)}")
    count = rows.pop() if rows else 1
    if count == 0 or count > MAX_ROWS:
        raise bad(f"between 1 and {MAX_ROWS} rows, got {count}")
    return arrays, count, singles == {True} or not singles


def _kind(field: Field) -> str:
    if field.datatype == "BYTES":
        return "text"
    if field.datatype == "BOOL":
        return "true or false"
    return f"a number ({field.datatype})"


def _column(field: Field, values: list[Any], allow_nan: bool) -> np.ndarray:
    dtype = NUMPY.get(field.datatype, "object")
    for row, value in enumerate(values):
        if value is None and allow_nan and dtype.startswith("float"):
            continue
        if not _fits(value, field.datatype, allow_nan):
            shown = "null" if value is None else repr(value)[:40]
            return_nan = " (this model takes no missing values)" if _is_missing(value) else ""
            raise bad(f"field {field.name!r}, row {row}: {shown} is not {_kind(field)}{return_nan}")
    if dtype.startswith("float"):
        return np.array([math.nan if v is None else v for v in values], dtype=dtype)
    return np.array(values, dtype=dtype)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fits(value: Any, datatype: str, allow_nan: bool) -> bool:
    if datatype == "BYTES":
        return isinstance(value, str)
    if datatype == "BOOL":
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if datatype.startswith(("INT", "UINT")):
        return isinstance(value, int)
    return allow_nan or math.isfinite(value)


def read_tensors(payload: dict[str, Any], signature: Signature) -> tuple[dict[str, np.ndarray], int, bool]:
    """Tensors -> one array per input (rows first), the number of rows, and whether the request was one row."""
    arrays: dict[str, np.ndarray] = {}
    rows: set[int] = set()
    singles: set[bool] = set()
    for field in signature.inputs:
        if field.name not in payload:
            raise bad(f"field {field.name!r}: missing; expected {field.expected()}")
        array = _tensor(field, payload[field.name], signature.allow_nan)
        single = array.ndim == len(field.shape) - 1
        if single:
            array = array[np.newaxis]
        for dim, (want, got) in enumerate(zip(field.shape, array.shape, strict=False)):
            if array.ndim != len(field.shape) or (want >= 0 and dim > 0 and want != got):
                raise bad(f"field {field.name!r}: shape {list(array.shape)} does not fit {list(field.shape)}")
        singles.add(single)
        rows.add(array.shape[0])
        arrays[field.name] = array
    if len(singles) > 1 or len(rows) > 1:
        raise bad("the inputs disagree on the number of rows")
    count = rows.pop() if rows else 1
    if count == 0 or count > MAX_ROWS:
        raise bad(f"between 1 and {MAX_ROWS} rows, got {count}")
    return arrays, count, singles == {True}


def _tensor(field: Field, value: Any, allow_nan: bool) -> np.ndarray:
    try:
        array = np.array(value, dtype=object if field.datatype == "BYTES" else None)
    except (ValueError, TypeError) as err:  # ragged lists
        raise bad(f"field {field.name!r}: not a rectangular array; expected {field.expected()}") from err
    kind = array.dtype.kind
    numeric = field.datatype not in ("BYTES", "BOOL")
    if field.datatype == "BOOL" and kind != "b":
        raise bad(f"field {field.name!r}: expected true/false values ({field.expected()})")
    if numeric and (kind not in "iuf" or (field.datatype.startswith(("INT", "UINT")) and kind == "f")):
        raise bad(f"field {field.name!r}: expected {field.expected()}, got {_described(array)}")
    if field.datatype == "BYTES" and not all(isinstance(x, str) for x in array.flat):
        raise bad(f"field {field.name!r}: expected text ({field.expected()})")
    if numeric and kind == "f" and not allow_nan and not np.isfinite(array).all():
        raise bad(f"field {field.name!r}: NaN or infinity, which this model cannot take")
    return array.astype(NUMPY[field.datatype]) if field.datatype in NUMPY else array


def _described(array: np.ndarray) -> str:
    return {"U": "text", "b": "true/false", "f": "fractions", "O": "mixed values"}.get(
        array.dtype.kind, str(array.dtype)
    )


def split(outputs: dict[str, Any], counts: list[tuple[int, bool]]) -> list[dict[str, Any]]:
    """Outputs of requests stacked into one call, cut back per request (`counts`: its rows, one-row?)."""
    listed = {name: _plain(value) for name, value in outputs.items()}
    total = sum(count for count, _ in counts)
    for name, value in listed.items():
        if len(value) != total:
            raise RuntimeError(f"output {name!r} has {len(value)} rows for {total} input rows")
    answers: list[dict[str, Any]] = []
    start = 0
    for count, single in counts:
        part = {name: value[start : start + count] for name, value in listed.items()}
        answers.append({name: v[0] for name, v in part.items()} if single else part)
        start += count
    return answers


def _plain(value: Any) -> list[Any]:
    """A library's output as JSON's lists (numpy scalars become Python's)."""
    if hasattr(value, "to_numpy"):  # pandas
        value = value.to_numpy()
    if isinstance(value, np.ndarray):
        return list(value.tolist())
    return [x.tolist() if isinstance(x, np.ndarray | np.generic) else x for x in value]
