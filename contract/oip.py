"""The Open Inference Protocol (KServe/Triton "v2") <-> the JSON objects a predict() sees. Pure: no I/O.

Request: each input tensor becomes one field, named as the tensor: its data
reshaped to the tensor's shape as nested lists, and a tensor of one element
(shape [1], [1, 1] or []) its single value, so `{"text": "..."}` is a BYTES
tensor of shape [1]. BYTES elements are UTF-8 text. Both of OIP's encodings are
read: JSON `data`, and the binary extension Triton's clients use by default
(`Inference-Header-Content-Length`, then each input's raw little-endian bytes,
BYTES elements as a 4-byte length and the bytes).

Response: each field of the output object becomes one tensor, in order: a
string BYTES [1], a bool BOOL [1], an int INT64 [1], a float FP64 [1]; a
rectangular nested list of one kind of scalar a tensor of its shape; anything
else (an object, a ragged or mixed list, null) BYTES [1] holding its JSON, with
parameter `content_type: json`.

Errors are OIP's: HTTP 400 with `{"error": "<what is wrong>"}`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from typing import Any

from contract.payload import encode, loads

PROTOCOL = "oip"
HEADER_LENGTH = "inference-header-content-length"  # the binary extension: JSON header length in bytes
MAX_INPUTS = 64
MAX_ELEMENTS = 10_000_000
_NUMERIC = {  # datatype -> (struct code, python type)
    "BOOL": ("?", bool),
    "UINT8": ("B", int),
    "UINT16": ("H", int),
    "UINT32": ("I", int),
    "UINT64": ("Q", int),
    "INT8": ("b", int),
    "INT16": ("h", int),
    "INT32": ("i", int),
    "INT64": ("q", int),
    "FP16": ("e", float),
    "FP32": ("f", float),
    "FP64": ("d", float),
}
DATATYPES = (*_NUMERIC, "BYTES")


class BadRequest(ValueError):
    """An inference request OIP clients should hear about as a 400 with this message."""


def decode_request(body: bytes, header_length: str | None = None) -> tuple[dict[str, Any], str]:
    """An inference request -> (the payload for predict(), the request id or "")."""
    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadRequest(f"{HEADER_LENGTH} {header_length[:20]!r} does not fit a body of {len(body)} bytes")
        body, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        request = loads(body)
    except (ValueError, RecursionError) as err:
        raise BadRequest(f"the request is not JSON: {err}") from err
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise BadRequest("expected an object with a non-empty 'inputs' list")
    if len(request["inputs"]) > MAX_INPUTS:
        raise BadRequest(f"at most {MAX_INPUTS} inputs, got {len(request['inputs'])}")
    payload: dict[str, Any] = {}
    offset = 0
    for i, tensor in enumerate(request["inputs"]):
        name, shape, datatype = _header(tensor, f"inputs[{i}]")
        if name in payload:
            raise BadRequest(f"inputs[{i}].name: {name!r} appears twice")
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise BadRequest(f"inputs[{i}]: binary_data_size {size!r} runs past the end of the body")
            flat = _from_binary(binary[offset : offset + size], datatype, f"inputs[{i}]")
            offset += size
        else:
            flat = _flatten(tensor.get("data"), f"inputs[{i}].data")
            flat = [_element(x, datatype, f"inputs[{i}].data") for x in flat]
        if len(flat) != math.prod(shape):
            raise BadRequest(f"inputs[{i}]: shape {shape} holds {math.prod(shape)} elements, data has {len(flat)}")
        payload[name] = _value(flat, shape, tensor, f"inputs[{i}]")
    request_id = request.get("id")
    return payload, request_id if isinstance(request_id, str) else ""


def _value(flat: list[Any], shape: list[int], tensor: dict[str, Any], where: str) -> Any:
    """A tensor's field value; BYTES marked `content_type: json` holds JSON text (what we encode that way)."""
    if (tensor.get("parameters") or {}).get("content_type") == "json" and len(flat) == 1:
        try:
            return json.loads(flat[0])
        except (ValueError, TypeError, RecursionError) as err:
            raise BadRequest(f"{where}: content_type json, but the data is not JSON") from err
    return flat[0] if len(flat) == 1 else _reshape(flat, shape)


def encode_request(payload: dict[str, Any]) -> dict[str, Any]:
    """A JSON object as an inference request (each field a tensor, as for a response)."""
    return {"inputs": [{"name": name, **_tensor(value)} for name, value in payload.items()]}


def decode_response(body: bytes) -> dict[str, Any]:
    """An OIP server's inference response -> the JSON object of its outputs (the request's mapping)."""
    try:
        response = loads(body)
    except (ValueError, RecursionError) as err:
        raise BadRequest(f"the answer is not JSON: {err}") from err
    if not isinstance(response, dict) or not isinstance(response.get("outputs"), list):
        raise BadRequest("the answer has no 'outputs' list")
    found: dict[str, Any] = {}
    for i, tensor in enumerate(response["outputs"][:MAX_INPUTS]):
        name, shape, datatype = _header(tensor, f"outputs[{i}]")
        flat = [_element(x, datatype, f"outputs[{i}].data") for x in _flatten(tensor.get("data"), f"outputs[{i}]")]
        if len(flat) != math.prod(shape):
            raise BadRequest(f"outputs[{i}]: shape {shape} holds {math.prod(shape)} elements, data has {len(flat)}")
        found[name] = _value(flat, shape, tensor, f"outputs[{i}]")
    return found


def _header(tensor: Any, where: str) -> tuple[str, list[int], str]:
    if not isinstance(tensor, dict):
        raise BadRequest(f"{where}: expected an object with name, shape, datatype and data")
    name, shape, datatype = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
    if not isinstance(name, str) or not name or len(name) > 256 or not name.isprintable():
        raise BadRequest(f"{where}.name: a printable name of 1 to 256 characters")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadRequest(f"{where}.shape: a list of non-negative integers")
    if len(shape) > 32 or math.prod(shape) > MAX_ELEMENTS:
        raise BadRequest(f"{where}.shape: at most 32 dimensions and {MAX_ELEMENTS} elements")
    if datatype not in DATATYPES:
        raise BadRequest(f"{where}.datatype: {str(datatype)[:20]!r} is not one of {', '.join(DATATYPES)}")
    return name, shape, str(datatype)


def _flatten(data: Any, where: str) -> list[Any]:
    if not isinstance(data, list):
        raise BadRequest(f"{where}: a list (flat, or nested as the shape)")
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:  # no recursion: a hostile nesting depth cannot blow the stack
        item = next(stack[-1], stack)
        if item is stack:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            flat.append(item)
    return flat


def _element(value: Any, datatype: str, where: str) -> Any:
    if datatype == "BYTES":
        if not isinstance(value, str):
            raise BadRequest(f"{where}: BYTES elements are strings")
        return value
    kind = _NUMERIC[datatype][1]
    if kind is bool and not isinstance(value, bool):
        raise BadRequest(f"{where}: BOOL elements are true or false")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise BadRequest(f"{where}: {datatype} elements are integers")
    if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise BadRequest(f"{where}: {datatype} elements are numbers")
    return value


def _from_binary(raw: bytes, datatype: str, where: str) -> list[Any]:
    if datatype == "BYTES":
        found, at = [], 0
        while at < len(raw):
            if at + 4 > len(raw) or at + 4 + (n := struct.unpack_from("<I", raw, at)[0]) > len(raw):
                raise BadRequest(f"{where}: a BYTES element runs past its binary data")
            try:
                found.append(raw[at + 4 : at + 4 + n].decode())
            except UnicodeDecodeError as err:
                raise BadRequest(f"{where}: BYTES elements must be UTF-8 text") from err
            at += 4 + n
        return found
    code = _NUMERIC[datatype][0]
    if len(raw) % struct.calcsize(code):
        raise BadRequest(f"{where}: {len(raw)} bytes is not a whole number of {datatype} elements")
    return [v for (v,) in struct.iter_unpack("<" + code, raw)]


def _reshape(flat: list[Any], shape: Sequence[int]) -> list[Any]:
    if len(shape) <= 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [_reshape(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def encode_response(model: str, version: str, output: dict[str, Any], request_id: str = "") -> dict[str, Any]:
    """predict()'s answer as an inference response of `model`."""
    response: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": []}
    if request_id:
        response["id"] = request_id
    for name, value in output.items():
        response["outputs"].append({"name": name, **_tensor(value)})
    return response


def _tensor(value: Any) -> dict[str, Any]:
    shape, flat = _shape_of(value)
    kinds = _kinds(flat)
    if shape is not None and len(kinds) == 1 and None not in kinds:
        return {"shape": shape or [1], "datatype": kinds.pop(), "data": flat}
    if shape is not None and kinds == {"INT64", "FP64"}:
        return {"shape": shape or [1], "datatype": "FP64", "data": [float(x) for x in flat]}
    return {"shape": [1], "datatype": "BYTES", "data": [json.dumps(value)], "parameters": {"content_type": "json"}}


def _kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "INT64" if -(2**63) <= value < 2**63 else None
    if isinstance(value, float):
        return "FP64" if math.isfinite(value) else None
    return "BYTES" if isinstance(value, str) else None


def _kinds(values: list[Any], types: set[type] | None = None) -> set[str | None]:
    """{_kind(x) for x in values}, without a call per element when all are of one built-in type (a tensor of a
    million floats: one sum instead of a million calls; a NaN or infinity makes the sum so, and falls through)."""
    types = set(map(type, values)) if types is None else types
    if types == {float} and math.isfinite(sum(values)):
        return {"FP64"}
    if types == {int} and -(2**63) <= min(values) and max(values) < 2**63:
        return {"INT64"}
    if types == {bool} or types == {str}:
        return {"BOOL" if bool in types else "BYTES"}
    return {_kind(x) for x in values}


def _shape_of(value: Any) -> tuple[list[int] | None, list[Any]]:
    """(shape, flat elements) of a rectangular nested list or a scalar; (None, []) when it is neither."""
    if not isinstance(value, list):
        return ([] if _kind(value) else None), [value]
    if not value:
        return [0], []
    types = set(map(type, value))
    if not any(issubclass(t, list) for t in types):  # the innermost dimension: elements, each with a kind or not
        return ([len(value)], value) if None not in _kinds(value, types) else (None, [])
    parts = [_shape_of(x) for x in value]
    inner = parts[0][0]
    if inner is None or any(shape != inner for shape, _ in parts):
        return None, []
    return [len(value), *inner], [x for _, flat in parts for x in flat]


def reencode(status: int, body: bytes, model: str, version: str, request_id: str = "") -> bytes:
    """A pipeline's JSON answer as an inference response; errors are already OIP's shape (`{"error": ...}`)."""
    if status != 200:
        return body
    try:
        output = loads(body)
    except (ValueError, RecursionError):
        return body
    if not isinstance(output, dict):
        return body
    return encode(encode_response(model, version, output, request_id))


def metadata(
    model: str, version: str, inputs: Sequence[dict[str, Any]] = (), outputs: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """GET /v2/models/<model>: a pipeline's inputs (its first stage's) and outputs (its last stage's), each
    `{name, datatype, shape}`, where its models' signatures are known (saved models); else empty lists."""
    return {
        "name": model,
        "versions": [version],
        "platform": "mllambda",
        "inputs": [_tensor_metadata(x) for x in inputs],
        "outputs": [_tensor_metadata(x) for x in outputs],
    }


def _tensor_metadata(field: dict[str, Any]) -> dict[str, Any]:
    datatype = str(field.get("datatype", "BYTES"))
    return {
        "name": str(field.get("name", "")),
        "datatype": datatype if datatype in DATATYPES else "BYTES",  # ANY (whatever JSON holds) travels as BYTES
        "shape": [int(d) for d in field.get("shape", [-1])],
    }


def infer_path(model: str) -> str:
    return f"/v2/models/{model}/infer"
