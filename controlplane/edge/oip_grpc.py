"""The Open Inference Protocol over gRPC <-> the gateway's OIP over HTTP. Pure: messages in, messages out.

A `ModelInferRequest` becomes the HTTP request the gateway already serves at `/v2/models/<pipeline>/infer`
in OIP's binary extension (a JSON header, then each input's raw bytes): typed `contents` go into the header as
`data`, `raw_input_contents` stay bytes, never turned into JSON text. The gateway's JSON answer becomes a
`ModelInferResponse` whose tensors are raw little-endian bytes (`raw_output_contents`), as Triton answers
(tritonclient's `as_numpy` reads those). An HTTP refusal becomes the gRPC status a client can act on, with the
gateway's reason as the message.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from contract import oip
from controlplane._gen.mllambda.oip.v2 import inference_pb2 as pb

SERVICE = "inference.GRPCInferenceService"  # the protocol's name: what clients call
MAX_MESSAGE = 64 * 2**20 + 2**20  # the largest pipeline max_body, and room for the tensors' headers
MAX_REASON = 1024  # characters of the gateway's reason in a status message

_CONTENTS = {  # datatype -> the InferTensorContents field that carries it
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "INT64": "int64_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_PACK = {"BOOL": "?", "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q", "UINT8": "B", "UINT16": "H"}
_PACK |= {"UINT32": "I", "UINT64": "Q", "FP16": "e", "FP32": "f", "FP64": "d"}
_STATUS = {  # the gateway's HTTP status -> gRPC's
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class Refused(Exception):
    """An answer for the caller as a gRPC status and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse(kind: Any, raw: bytes) -> Any:
    """A request message of `kind` from its bytes; bytes that are not one are the caller's mistake."""
    try:
        return kind.FromString(raw)
    except DecodeError as err:
        name = kind.DESCRIPTOR.name
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a {name}: {err}") from err


def infer_body(request: pb.ModelInferRequest) -> tuple[bytes, int]:
    """(the HTTP body, its JSON header's length) for the gateway's OIP infer path."""
    raws = list(request.raw_input_contents)
    if raws and len(raws) != len(request.inputs):
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"raw_input_contents holds {len(raws)} tensors for {len(request.inputs)} inputs (one each, in order)",
        )
    if len(request.inputs) > oip.MAX_INPUTS:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"at most {oip.MAX_INPUTS} inputs, got {len(request.inputs)}")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        where = f"inputs[{i}]"
        header: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if tensor.datatype not in _CONTENTS and tensor.datatype != "FP16":
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{where}.datatype: {tensor.datatype[:20]!r} is unknown")
        typed = tensor.HasField("contents") and tensor.contents.ByteSize() > 0
        if raws:
            if typed:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: contents and raw_input_contents both given")
            header["parameters"] = {"binary_data_size": len(raws[i])}
        elif tensor.datatype == "FP16":
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: FP16 travels in raw_input_contents only")
        else:
            header["data"] = _typed(tensor.contents, tensor.datatype, where)
        inputs.append(header)
    head: dict[str, Any] = {"inputs": inputs}
    if request.id:
        head["id"] = request.id
    text = json.dumps(head).encode()
    return text + b"".join(raws), len(text)


def _typed(contents: pb.InferTensorContents, datatype: str, where: str) -> list[Any]:
    values = list(getattr(contents, _CONTENTS[datatype]))
    if datatype != "BYTES":
        return values
    try:
        return [v.decode() for v in values]
    except UnicodeDecodeError as err:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{where}: BYTES elements must be UTF-8 text") from err


def infer_response(body: bytes) -> pb.ModelInferResponse:
    """The gateway's OIP JSON answer -> a ModelInferResponse with raw tensors."""
    try:
        answer = json.loads(body)
        outputs = answer["outputs"]
        if not isinstance(outputs, list):
            raise TypeError("outputs is not a list")
        response = pb.ModelInferResponse(
            model_name=str(answer.get("model_name", "")),
            model_version=str(answer.get("model_version", "")),
            id=str(answer.get("id", "")),
        )
        for tensor in outputs:
            name, datatype, shape = str(tensor["name"]), str(tensor["datatype"]), [int(d) for d in tensor["shape"]]
            flat = oip._flatten(tensor.get("data", []), name)
            if len(flat) != math.prod(shape):
                raise ValueError(f"output {name}: shape {shape} but {len(flat)} elements")
            out = response.outputs.add(name=name, datatype=datatype, shape=shape)
            for key, value in (tensor.get("parameters") or {}).items():
                if isinstance(value, str):
                    out.parameters[str(key)].string_param = value
            response.raw_output_contents.append(_raw(flat, datatype))
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, struct.error) as err:
        raise Refused(grpc.StatusCode.INTERNAL, f"the pipeline's answer is not an inference response: {err}") from err
    return response


def _raw(flat: list[Any], datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = [(x if isinstance(x, str) else json.dumps(x)).encode() for x in flat]
        return b"".join(struct.pack("<I", len(p)) + p for p in parts)
    return struct.pack(f"<{len(flat)}{_PACK[datatype]}", *flat)


def refusal(status: int, body: bytes) -> Refused:
    """The gateway's HTTP refusal as a gRPC status, its reason (OIP's `{"error": ...}`) as the message."""
    try:
        reason = str(json.loads(body).get("error", ""))
    except (ValueError, AttributeError, RecursionError):
        reason = ""
    reason = reason or body.decode(errors="replace").strip() or f"HTTP {status}"
    code = _STATUS.get(status, grpc.StatusCode.UNKNOWN)
    return Refused(code, f"{reason[:MAX_REASON]} (gateway HTTP {status})")


def metadata_response(body: bytes) -> pb.ModelMetadataResponse:
    try:
        about = json.loads(body)
        response = pb.ModelMetadataResponse(
            name=str(about["name"]),
            versions=[str(v) for v in about.get("versions", [])],
            platform=str(about.get("platform", "")),
        )
        for side in ("inputs", "outputs"):
            for t in about.get(side, []):
                getattr(response, side).add(name=str(t["name"]), datatype=str(t["datatype"]), shape=t["shape"])
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as err:
        raise Refused(grpc.StatusCode.INTERNAL, f"the pipeline's metadata is not OIP's: {err}") from err
    return response


def model_path(name: str) -> str:
    """`/v2/models/<name>`, for a name that can only be a pipeline's (no path tricks)."""
    if not name or len(name) > 253 or not all(c.isalnum() or c in "-_." for c in name) or name in (".", ".."):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"model name {name[:64]!r}: a pipeline's name")
    return f"/v2/models/{name}"
