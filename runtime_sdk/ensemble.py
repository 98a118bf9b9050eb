"""Asking other stages and sending their answer on: an ensemble's members, an OIP stage.

The runtime that sends into an ensemble stage asks its members, through its egress (runtime_sdk/egress.py).

All members are asked at once through the runtime's egress (runtime_sdk/egress.py),
so the stage takes as long as its slowest member, not their sum. Each
request goes through the sidecars like any hop (retries, outlier detection,
metrics, mTLS); Envoy's route holds the member's timeout, and the runtime's
own deadline (a little later) covers a sidecar that does not answer at all.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from contract import headers as h
from contract.fanout import FanOut, Member, merge
from contract.oip import BadRequest, decode_response, encode_request
from runtime_sdk.egress import Egress
from runtime_sdk.hop import HopError, header_safe

GRACE = 0.2  # seconds past a member's timeout before the runtime stops waiting for its sidecar
REASON_CHARS = 300


@dataclass
class Answers:
    """What the members said: the merged output, or the required member that failed and how."""

    merged: dict[str, Any] | None = None
    served: list[str] = field(default_factory=list)  # the members' x-mll-served entries, in member order
    failed: str = ""  # a required member's name
    status: int = 200
    reason: str = ""


@dataclass(frozen=True)
class _Said:
    status: int  # 0: no answer (timeout, unreachable)
    output: dict[str, Any] | None
    served: str
    reason: str


def hop_headers(incoming: Mapping[str, str], output: Mapping[str, Any], branch_field: str = "") -> dict[str, str]:
    """What a request to another hop carries: the trace headers, and the branch its output picks."""
    outgoing = {k: incoming[k] for k in h.PROPAGATED if k in incoming}
    outgoing["content-type"] = "application/json"
    if branch_field and isinstance(key := output.get(branch_field), str | int) and not isinstance(key, bool):
        if header_safe(str(key)):  # a key with a line break names no branch: sent without one, it gets that 422
            outgoing[h.BRANCH] = str(key)
    return outgoing


def _detail(text: bytes) -> str:
    """What a failed hop said: its `error`, else the start of its body."""
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    found = answer.get("error") if isinstance(answer, dict) else None
    return str(found) if found else text[:200].decode(errors="replace")


async def ask(
    egress: Egress, transport: str, fan: FanOut, body: bytes, headers: Mapping[str, str], output: Any
) -> Answers:
    """Send `body` to every member at its path; merge the answers by member name."""
    outgoing = hop_headers(headers, output, fan.branch_field)
    said = await asyncio.gather(*(_one(egress, transport, fan.member_path(m), m, body, outgoing) for m in fan.members))
    answers, missing = {}, {}
    result = Answers(served=[s.served for s in said if s.served])
    for member, s in zip(fan.members, said, strict=True):
        if s.output is not None:
            answers[member.name] = s.output
        elif member.required:
            result.failed, result.reason = member.name, s.reason
            result.status = 504 if s.reason.startswith("timed out") else _failure_status(s.status)
            return result
        else:
            missing[member.name] = s.reason
    result.merged = merge(answers, missing)
    return result


@dataclass(frozen=True)
class Asked:
    output: dict[str, Any] | None  # None: failed
    served: str
    status: int = 200
    reason: str = ""


async def ask_oip_stage(egress: Egress, headers: Mapping[str, str], path: str, output: dict[str, Any]) -> Asked:
    """An OIP stage's models answer and never forward: ask it through the own sidecar; its answer goes on.

    The output goes as an inference request (contract.oip: each field a tensor) and
    the response's tensors come back as fields. Its failure is the request's.
    """
    stage = path.rsplit("/", 1)[-1]
    transport, request = headers.get(h.TRANSPORT, "http"), json.dumps(encode_request(output))
    try:
        answer = await egress.post(transport, path, request, hop_headers(headers, {}))
        text, status, served = answer.body, answer.status, answer.headers.get(h.SERVED, "")
    except HopError as err:
        return Asked(None, "", 503, f"OIP stage {stage!r} unreachable: {err}"[:REASON_CHARS])
    if status != 200:
        reason = f"OIP stage {stage!r} answered {status}: {_detail(text)}"[:REASON_CHARS]
        return Asked(None, served, _failure_status(status), reason)
    try:
        return Asked(decode_response(text), served)
    except BadRequest as err:
        return Asked(None, served, 502, f"OIP stage {stage!r}: {err}"[:REASON_CHARS])


def _failure_status(status: int) -> int:
    """A member's 4xx (its input refused) is the caller's too; anything else is a bad gateway."""
    return status if 400 <= status < 500 else 502


async def _one(
    egress: Egress, transport: str, path: str, member: Member, body: bytes, headers: dict[str, str]
) -> _Said:
    seconds = member.timeout_ms / 1000
    try:
        async with asyncio.timeout(seconds + GRACE):
            answer = await egress.post(transport, path, body, headers)
        text, served, status = answer.body, answer.headers.get(h.SERVED, ""), answer.status
    except TimeoutError:
        return _Said(0, None, "", f"timed out after {member.timeout_ms} ms")
    except HopError as err:
        return _Said(0, None, "", f"unreachable: {err}"[:REASON_CHARS])
    if status == 504:
        return _Said(status, None, served, f"timed out after {member.timeout_ms} ms")
    try:
        output = json.loads(text)
    except ValueError:
        output = None
    if status != 200 or not isinstance(output, dict):
        return _Said(status, None, served, f"answered {status}: {_detail(text)}"[:REASON_CHARS])
    return _Said(status, output, served, "")
