"""The dashboard's edit forms as pure functions: a pipeline's plain form -> fields, a posted form -> a new plain form.

Every field is named by its path in the definition (`stages[2].branches[0].variants[1].weight`), the same
path `spec.py` names in its problems, so each problem the server reports lands next to its field. The
posted form only edits the leaves listed in EDITABLE; the result is validated by `parse_pipeline` and
then by the admin API like any other definition.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from controlplane.pipeline.model import Problem

TRANSPORTS = ("http", "uds", "kafka")
_HOLDER = r"stages\[\d+\](?:\.members\[\d+\])?"
EDITABLE = re.compile(
    rf"^(?:{_HOLDER}(?:\.branches\[\d+\])?\.variants\[\d+\]\.weight|{_HOLDER}\.shadow\.(?:model|version|percent)|transport)$"
)
_STEP = re.compile(r"^([a-z_]+)(?:\[(\d+)\])?$")


@dataclass(frozen=True)
class WeightField:
    path: str  # ...variants[i].weight
    variant: str  # model:version
    weight: Any


@dataclass(frozen=True)
class Group:
    path: str  # ...variants: where "weights must add up to more than 0" is reported
    label: str
    fields: tuple[WeightField, ...]


@dataclass(frozen=True)
class ShadowSlot:
    path: str  # the stage or member holding it; its fields are path + ".shadow.model" etc.
    label: str
    shadow: Mapping[str, Any] | None


def groups(doc: Mapping[str, Any]) -> Iterator[Group]:
    """Every weighted list of variants: a stage's, a branch's, a member's (and a member's branches)."""
    for k, stage in enumerate(doc.get("stages") or []):
        holders = [(f"stages[{k}]", stage["name"], stage)]
        holders += [
            (f"stages[{k}].members[{m}]", f"{stage['name']} · member {member['name']}", member)
            for m, member in enumerate(stage.get("members") or [])
        ]
        for path, label, holder in holders:
            if holder.get("variants"):
                yield _group(f"{path}.variants", label, holder["variants"])
            for j, branch in enumerate(holder.get("branches") or []):
                yield _group(f"{path}.branches[{j}].variants", f"{label} · branch {branch['key']}", branch["variants"])


def _group(path: str, label: str, variants: list[Mapping[str, Any]]) -> Group:
    fields = tuple(
        WeightField(f"{path}[{i}].weight", f"{v['model']}:{v['version']}", v.get("weight", 1))
        for i, v in enumerate(variants)
    )
    return Group(path, label, fields)


def shadow_slots(doc: Mapping[str, Any]) -> Iterator[ShadowSlot]:
    """Where a shadow may go: a plain stage, or each member of an ensemble (not the ensemble stage itself)."""
    for k, stage in enumerate(doc.get("stages") or []):
        if stage.get("members"):
            for m, member in enumerate(stage["members"]):
                label = f"{stage['name']} · member {member['name']}"
                yield ShadowSlot(f"stages[{k}].members[{m}]", label, member.get("shadow"))
        else:
            yield ShadowSlot(f"stages[{k}]", stage["name"], stage.get("shadow"))


def edited(doc: Mapping[str, Any], form: Mapping[str, str]) -> dict[str, Any]:
    """The definition with the form's values put in; fields outside EDITABLE are ignored.

    A value that is not a number stays text, so the parser reports it at its path like any other problem.
    A shadow whose three fields are emptied, or whose "remove" box is ticked, is removed.
    """
    out = copy.deepcopy(dict(doc))
    for slot in shadow_slots(out):
        parts = {f: str(form.get(f"{slot.path}.shadow.{f}", "")).strip() for f in ("model", "version", "percent")}
        holder = _walk(out, slot.path)
        if form.get(f"{slot.path}.shadow.remove") or not any(parts.values()):
            if f"{slot.path}.shadow.model" in form or form.get(f"{slot.path}.shadow.remove"):
                holder.pop("shadow", None)
            continue
        holder["shadow"] = {"model": parts["model"], "version": parts["version"], "percent": _number(parts["percent"])}
    for path, value in form.items():
        if EDITABLE.match(path) and ".shadow." not in path:
            parent, _, leaf = path.rpartition(".")
            target = _walk(out, parent) if parent else out
            if target is not None:
                target[leaf] = _number(str(value).strip()) if leaf == "weight" else str(value)
    return out


def _walk(doc: Any, path: str) -> Any:
    """The mapping at `path`, or None when the form names something this definition does not have."""
    node = doc
    for step in path.split("."):
        match = _STEP.match(step)
        if match is None or not isinstance(node, dict):
            return None
        node = node.get(match.group(1))
        if match.group(2) is not None:
            index = int(match.group(2))
            node = node[index] if isinstance(node, list) and index < len(node) else None
    return node if isinstance(node, dict) else None


def _number(text: str) -> Any:
    """A number when it reads as one (so "-3" is reported as out of range, not as text), else the text."""
    if re.fullmatch(r"-?\d{1,9}", text):
        return int(text)
    if re.fullmatch(r"-?\d{0,9}\.\d{1,6}|-?\d{1,9}\.", text):
        return float(text)
    return text


def problems_from_details(details: str) -> list[Problem]:
    """The admin API's INVALID_ARGUMENT details ("path: message; path: message") back into problems."""
    problems = []
    for part in details.split("; "):
        path, sep, message = part.partition(": ")
        problems.append(Problem(path, message) if sep and " " not in path else Problem("", part))
    return problems


def as_yaml(doc: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(doc), sort_keys=False, allow_unicode=True)


def diff_lines(old: Mapping[str, Any], new: Mapping[str, Any], old_name: str, new_name: str) -> list[str]:
    return list(
        difflib.unified_diff(as_yaml(old).splitlines(), as_yaml(new).splitlines(), old_name, new_name, n=3, lineterm="")
    )
