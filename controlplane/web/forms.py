"""The dashboard's edit forms as pure functions: a pipeline's plain form -> fields, a posted form -> a new plain form.

Every field is named by its path in the definition (`stages[2].branches[0].variants[1].weight`), the same
path `spec.py` names in its problems, so each problem the server reports lands next to its field. The
posted form only edits the leaves listed in EDITABLE, and adds, removes or starts what `changes` reads
(a variant added at a share, a variant removed, a rollout started); the result is validated by
`parse_pipeline` and then by the admin API like any other definition.
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
    A shadow whose three fields are emptied, or whose "remove" box is ticked, is removed. Then each group's
    variants ticked "remove" go, a variant picked in "add" joins at its share (the others keep their
    proportions in the rest), and a rollout is started where a candidate is picked (see `changes`).
    """
    out = _values_put(doc, form)
    done = [c for c in changes(out, form) if not c.problem]
    for change in done:
        change.apply(out)
    for change in done:
        holder = at_path(out, change.group.rpartition(".")[0])
        holder["variants"] = [v for v in holder["variants"] if v is not None]
    return out


def _values_put(doc: Mapping[str, Any], form: Mapping[str, str]) -> dict[str, Any]:
    out = copy.deepcopy(dict(doc))
    for slot in shadow_slots(out):
        parts = {f: str(form.get(f"{slot.path}.shadow.{f}", "")).strip() for f in ("model", "version", "percent")}
        holder = at_path(out, slot.path)
        if form.get(f"{slot.path}.shadow.remove") or not any(parts.values()):
            if f"{slot.path}.shadow.model" in form or form.get(f"{slot.path}.shadow.remove"):
                holder.pop("shadow", None)
            continue
        holder["shadow"] = {"model": parts["model"], "version": parts["version"], "percent": _number(parts["percent"])}
    for path, value in form.items():
        if EDITABLE.match(path) and ".shadow." not in path:
            parent, _, leaf = path.rpartition(".")
            target = at_path(out, parent) if parent else out
            if target is not None:
                target[leaf] = _number(str(value).strip()) if leaf == "weight" else str(value)
    return out


ADD, SHARE, REMOVE, START, STEPS = ".add", ".add_share", ".remove", ".rollout.start", ".rollout.steps"
DEFAULT_STEPS = "5, 25, 50, 100"


@dataclass(frozen=True)
class Change:
    """One addition, removal or rollout start read from the form: where, what, and why not (its problem)."""

    path: str  # the form field the problem is reported at
    group: str  # ...variants
    kind: str  # add | remove | start
    variant: tuple[str, str] = ("", "")
    share: int = 0
    index: int = -1
    steps: tuple[int, ...] = ()
    problem: str = ""

    def apply(self, doc: dict[str, Any]) -> None:
        """Put this change in; a removed variant becomes None (indexes stay the page's until `edited` drops them)."""
        holder = at_path(doc, self.group.rpartition(".")[0])
        variants = holder["variants"]
        if self.kind == "remove":
            variants[self.index] = None
        elif self.kind == "add":
            total = sum(v.get("weight", 1) for v in variants if v) or 1
            for v in variants:
                if v:
                    v["weight"] = round(v.get("weight", 1) * (100 - self.share) / total)
            variants.append({"model": self.variant[0], "version": self.variant[1], "weight": self.share})
        else:
            candidate = {"model": self.variant[0], "version": self.variant[1]}
            holder["rollout"] = {"candidate": candidate, "steps": list(self.steps)}


def changes(doc: Mapping[str, Any], form: Mapping[str, str]) -> list[Change]:
    """What the form asks to add, remove or start, per group, each with its problem ("" when fine). Removals
    come first (a group's indexes are the page's), then additions, then rollouts."""
    found: list[Change] = []
    for group in groups(doc):
        ticked = [(i, f.path.removesuffix(".weight") + REMOVE) for i, f in enumerate(group.fields)]
        ticked = [(i, name) for i, name in ticked if form.get(name)]
        problem = "" if len(ticked) < len(group.fields) else "a group keeps at least one variant"
        found += [Change(name, group.path, "remove", index=i, problem=problem) for i, name in ticked]
    for group in groups(doc):
        picked = str(form.get(group.path + ADD, "")).strip()
        if picked:
            found.append(_addition(group, picked, str(form.get(group.path + SHARE, "")).strip()))
        holder = group.path.removesuffix(".variants")
        start = str(form.get(holder + START, "")).strip()
        if start and ".members[" not in holder:
            found.append(_start(group, holder, start, str(form.get(holder + STEPS, "")).strip() or DEFAULT_STEPS))
    return found


def form_problems(doc: Mapping[str, Any], form: Mapping[str, str]) -> list[Problem]:
    """What the form's additions, removals and rollout starts cannot do, each at its field."""
    return [Problem(c.path, c.problem) for c in changes(_values_put(doc, form), form) if c.problem]


def _model_version(picked: str) -> tuple[str, str] | None:
    model, sep, version = picked.partition(":")
    return (model, version) if sep and model and version and len(picked) <= 200 else None


def _addition(group: Group, picked: str, share_text: str) -> Change:
    where, problem = group.path + ADD, ""
    variant = _model_version(picked)
    share = _number(share_text)
    if variant is None:
        problem = f"pick a model version as MODEL:VERSION, got {picked[:60]!r}"
    elif any(f.variant == picked for f in group.fields):
        problem = f"{picked} is in this group already: change its weight"
    elif not isinstance(share, int) or not 0 < share < 100:
        where, problem = group.path + SHARE, f"a share in percent from 1 to 99, got {share_text[:20]!r}"
    return Change(
        where, group.path, "add", variant or ("", ""), share if isinstance(share, int) else 0, problem=problem
    )


def _start(group: Group, holder: str, picked: str, steps_text: str) -> Change:
    where, problem = holder + START, ""
    variant = _model_version(picked)
    steps = tuple(_number(s.strip()) for s in steps_text.split(",") if s.strip())
    if variant is None:
        problem = f"pick a candidate as MODEL:VERSION, got {picked[:60]!r}"
    elif not steps or len(steps) > 20 or not all(isinstance(s, int) and 0 < s <= 100 for s in steps):
        where, problem = holder + STEPS, f"percents from 1 to 100 separated by commas, got {steps_text[:40]!r}"
    ok_steps = tuple(s for s in steps if isinstance(s, int))
    return Change(where, group.path, "start", variant or ("", ""), steps=ok_steps, problem=problem)


def at_path(doc: Any, path: str) -> Any:
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
