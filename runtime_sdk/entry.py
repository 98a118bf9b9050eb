"""What only a pipeline's first stage does, for the gateway's client: speak OIP, log payloads."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from contract import headers as h
from contract import oip
from contract.naming import STAGE_PATH
from runtime_sdk.payload_log import PayloadLog, body_value, record

OIP_ID = "mll_oip_id"  # request key: the OIP request's id, echoed in its response


def as_oip(request: web.Request, response: web.Response) -> web.Response:
    """The first stage answers an OIP client in OIP: the pipeline's JSON answer as output tensors."""
    headers = request.headers
    if headers.get(h.PROTOCOL) == oip.PROTOCOL and isinstance(response.body, bytes):
        model, version = headers.get(h.OIP_MODEL, ""), headers.get(h.OIP_VERSION, "")
        response.body = oip.reencode(response.status, response.body, model, version, request.get(OIP_ID, ""))
    return response


def oip_payload(request: web.Request, body: bytes) -> dict[str, Any]:
    """The gateway's OIP route: tensors in (oip.BadRequest says what is wrong); the id kept for the answer."""
    payload, request[OIP_ID] = oip.decode_request(body, request.headers.get(oip.HEADER_LENGTH))
    return payload


async def log_payload(payloads: PayloadLog, request: web.Request, response: web.Response, started: float) -> None:
    """One sampled record of the pipeline's request and answer (this runtime is its first stage)."""
    parts = STAGE_PATH.fullmatch(request.path)
    if parts is None or not isinstance(response.body, bytes):
        return
    pipeline, version = parts.group(1), parts.group(2)
    entry = record(
        pipeline, version, request.headers.get("x-request-id", ""), response.status, started,
        response.headers.get(h.SERVED, ""), body_value(await request.read()), body_value(response.body),
    )  # fmt: skip
    payloads.offer(pipeline, entry)
