"""An ensemble stage's fan-out, as the control plane tells it to the runtime that asks the members.

The model that sends into an ensemble stage (the previous stage's, or the
previous ensemble's join) gets, on its sidecar's ingress route, the members to
ask: each one's path on its own sidecar's egress (the stage path + `/<member>`),
its timeout, and whether the answer is required. The runtime sends its output
to all of them at once through its sidecar, so retries, outlier detection,
metrics and mTLS apply to every member as to any other hop, and merges the
answers by member name. The control plane writes these headers; the SDK reads
them and refuses anything it did not write.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from contract.naming import LABEL, STAGE_PATH

MISSING = "_missing"  # merged output: optional member -> why it is left out ("_" starts no member name)
MAX_MEMBERS = 8
_ENTRY = re.compile(r"([a-z0-9-]{1,63})=([0-9]{1,6})(\?)?")  # name=timeout_ms, "?" when optional


@dataclass(frozen=True)
class Member:
    name: str
    timeout_ms: int
    required: bool


@dataclass(frozen=True)
class FanOut:
    path: str  # the ensemble stage's path on the sender's egress; member `m` is at `<path>/m`
    members: tuple[Member, ...]
    branch_field: str = ""  # output field that picks a member's branch (members with branches)

    def member_path(self, member: Member) -> str:
        return f"{self.path}/{member.name}"

    def header_value(self) -> str:
        return ",".join(f"{m.name}={m.timeout_ms}{'' if m.required else '?'}" for m in self.members)

    @classmethod
    def parse(cls, path: str, members: str, branch_field: str = "") -> FanOut:
        """What the steering headers say; ValueError for anything the control plane would not have written."""
        if not STAGE_PATH.fullmatch(path):
            raise ValueError("the fan-out path is not a stage path")
        found = []
        for entry in members.split(",")[: MAX_MEMBERS + 1]:
            match = _ENTRY.fullmatch(entry)
            if not match or not LABEL.fullmatch(match.group(1)) or int(match.group(2)) == 0:
                raise ValueError(f"not a fan-out member: {entry[:80]!r}")
            found.append(Member(match.group(1), int(match.group(2)), match.group(3) is None))
        if len(found) > MAX_MEMBERS or len({m.name for m in found}) != len(found):
            raise ValueError("too many or repeated fan-out members")
        return cls(path, tuple(found), branch_field)


def merge(answers: Mapping[str, dict[str, Any]], missing: Mapping[str, str]) -> dict[str, Any]:
    """The members' answers by name; optional members left out are listed, with why, under MISSING."""
    merged: dict[str, Any] = dict(answers)
    if missing:
        merged[MISSING] = dict(missing)
    return merged
