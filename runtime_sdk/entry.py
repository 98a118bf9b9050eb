"""What only a pipeline's first stage does, for the gateway's client: speak OIP, log payloads."""

from __future__ import annotations

from typing import Any

from contract import headers as h
from contract import oip
from contract.naming import STAGE_PATH
from runtime_sdk.http1 import Request, Response
from runtime_sdk.payload_log import PayloadLog, body_value, record

OIP_ID = "oip_id"  # request note: the OIP request's id, echoed in its response


def as_oip(request: Request, response: Response) -> Response:
    """The first stage answers an OIP client in OIP: the pipeline's JSON answer as output tensors."""
    headers = request.headers
    if headers.get(h.PROTOCOL) == oip.PROTOCOL:
        model, version = headers.get(h.OIP_MODEL, ""), headers.get(h.OIP_VERSION, "")
        response.body = oip.reencode(response.status, response.body, model, version, request.notes.get(OIP_ID, ""))
    return response


def oip_payload(request: Request, body: bytes) -> dict[str, Any]:
    """The gateway's OIP route: tensors in (oip.BadRequest says what is wrong); the id kept for the answer."""
    payload, request.notes[OIP_ID] = oip.decode_request(body, request.headers.get(oip.HEADER_LENGTH))
    return payload


async def log_payload(payloads: PayloadLog, request: Request, response: Response, started: float) -> None:
    """One sampled record of the pipeline's request and answer (this runtime is its first stage)."""
    parts = STAGE_PATH.fullmatch(request.path)
    if parts is None:
        return
    pipeline, version = parts.group(1), parts.group(2)
    entry = record(
        pipeline,
        version,
        request.headers.get("x-request-id", ""),
        response.status,
        started,
        response.headers.get(h.SERVED, ""),
        body_value(request.body),
        body_value(response.body),
    )
    if request.headers.get(h.PROTOCOL) == oip.PROTOCOL:
        entry["protocol"] = oip.PROTOCOL  # a replay sends it to the OIP path again
    payloads.offer(pipeline, entry)
