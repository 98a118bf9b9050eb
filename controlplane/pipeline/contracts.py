"""Do a pipeline's stages fit each other? Checked from the contracts of the model versions they name. Pure.

A contract is what a model version reads and answers (`{"inputs": [{name, datatype,
shape}], "outputs": [...]}`): the signature a saved model's library reported at build,
or the `contract:` of a package's manifest. A stage passes on its model's answer and
nothing else, so each field a stage's model reads must be among the fields every
variant of the stage before it answers; so must the field a branching stage picks its
branch by (`branch_on`). Checked only where every variant involved has a contract:
a version without one, an ensemble (its merged answer) or an OIP stage (its answer
goes on from the stage before) leaves that pair of stages unchecked, and `describe`
says so. The first stage reads the caller's request: checked against the
pipeline's declared `input` when it has one. A branching stage's keys are checked
against the values the stage before can answer in its `branch_on` field, when
every version there declares them (an `enum`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controlplane.pipeline.model import Pipeline, Problem, Shadow, Stage, Variant

Contracts = Mapping[tuple[str, str], Mapping[str, Any]]  # (model, version) -> its contract


def _names(contract: Mapping[str, Any], side: str) -> set[str]:
    return {str(f.get("name")) for f in contract.get(side) or () if isinstance(f, dict)}


def _plain(stage: Stage) -> bool:
    return not stage.members and stage.protocol != "oip"


def _enum(contract: Mapping[str, Any], name: str) -> set[str] | None:
    """The values a contract answers in field `name` (None: any)."""
    for f in contract.get("outputs") or ():
        if isinstance(f, dict) and f.get("name") == name and isinstance(f.get("enum"), list):
            return {str(v) for v in f["enum"]}
    return None


def _input_problems(pipeline: Pipeline, contracts: Contracts) -> list[Problem]:
    """Fields the first stage's models read that the pipeline's declared input does not hold."""
    first = pipeline.stages[0] if pipeline.stages else None
    if not pipeline.input or first is None or not _plain(first):
        return []
    given = {name for name, _ in pipeline.input}
    shown = ", ".join(sorted(given))
    found = []
    for path, variant in _variants(first, 0):
        contract = contracts.get((variant.model, variant.version))
        for name in sorted(_names(contract, "inputs") - given) if contract is not None else ():
            found.append(
                Problem(
                    path,
                    f"{variant.model}:{variant.version} reads {name!r}, which the pipeline's "
                    f"input does not hold (input: {shown})",
                )
            )
    return found


def _key_problems(stage: Stage, k: int, before: Stage, answers: list[Mapping[str, Any]]) -> list[Problem]:
    """Branch keys the stage before can never answer, when every version there declares its values."""
    enums = [_enum(a, stage.branch_on) for a in answers]
    if not enums or any(e is None for e in enums):
        return []
    possible = set().union(*(e for e in enums if e is not None))
    shown = ", ".join(sorted(possible)[:20])
    why = f"is never answered by stage {before.name!r} ({stage.branch_on} is one of: {shown})"
    return [
        Problem(f"stages[{k}].branches[{i}].key", f"{b.key!r} {why}")
        for i, b in enumerate(stage.branches)
        if str(b.key) not in possible
    ]


def problems(pipeline: Pipeline, contracts: Contracts) -> list[Problem]:
    """Every field a stage needs that the stage before (or the caller) never gives, every impossible branch key."""
    found: list[Problem] = _input_problems(pipeline, contracts)
    for k in range(1, len(pipeline.stages)):
        before, stage = pipeline.stages[k - 1], pipeline.stages[k]
        if not (_plain(before) and _plain(stage)):
            continue
        answers = [contracts.get((v.model, v.version)) for v in _all(before)]
        if not answers or any(a is None for a in answers):
            continue
        given = set.intersection(*(_names(a, "outputs") for a in answers if a is not None))
        shown = ", ".join(sorted(given)) or "nothing"
        if stage.branches and stage.branch_on not in given:
            found.append(
                Problem(
                    f"stages[{k}].branch_on",
                    f"{stage.branch_on!r} is not answered by stage {before.name!r} (it answers: {shown})",
                )
            )
        elif stage.branches:
            found += _key_problems(stage, k, before, [a for a in answers if a is not None])
        for path, variant in _variants(stage, k):
            contract = contracts.get((variant.model, variant.version))
            if contract is None:
                continue
            for name in sorted(_names(contract, "inputs") - given):
                found.append(
                    Problem(
                        path,
                        f"{variant.model}:{variant.version} reads {name!r}, which stage {before.name!r} "
                        f"never answers (it answers: {shown})",
                    )
                )
    return found


def _all(stage: Stage) -> list[Variant]:
    """Every model version that may answer for the stage: its variants, a rollout's candidate, a shadow."""
    found = list(stage.all_variants())
    found += [r.candidate for r in (stage.rollout, *(b.rollout for b in stage.branches)) if r is not None]
    return found


def contract_variants(stage: Stage) -> list[Variant | Shadow]:
    """Every model version of a stage whose contract matters: its variants, candidates and shadow."""
    return [*_all(stage), *([stage.shadow] if stage.shadow else [])]


def _variants(stage: Stage, k: int) -> list[tuple[str, Variant | Shadow]]:
    found: list[tuple[str, Variant | Shadow]] = [
        (f"stages[{k}].variants[{i}]", v) for i, v in enumerate(stage.variants)
    ]
    for b, branch in enumerate(stage.branches):
        found += [(f"stages[{k}].branches[{b}].variants[{i}]", v) for i, v in enumerate(branch.variants)]
        if branch.rollout is not None:
            found.append((f"stages[{k}].branches[{b}].rollout.candidate", branch.rollout.candidate))
    if stage.rollout is not None:
        found.append((f"stages[{k}].rollout.candidate", stage.rollout.candidate))
    if stage.shadow is not None:
        found.append((f"stages[{k}].shadow", stage.shadow))
    return found


def coverage(pipeline: Pipeline, contracts: Contracts) -> list[str]:
    """For each stage after the first: checked against the one before it, or why not (for `describe`); the
    first stage too when the pipeline declares its input."""
    notes = []
    first = pipeline.stages[0] if pipeline.stages else None
    if pipeline.input and first is not None:
        variants = contract_variants(first)
        unknown = sorted(f"{v.model}:{v.version}" for v in variants if (v.model, v.version) not in contracts)
        why = f"no contract for {', '.join(unknown[:4])}" if unknown else "an ensemble or OIP stage"
        checked = _plain(first) and not unknown
        notes.append(f"{first.name}: " + ("checked against the pipeline's input" if checked else f"unchecked ({why})"))
    for k in range(1, len(pipeline.stages)):
        before, stage = pipeline.stages[k - 1], pipeline.stages[k]
        if not (_plain(before) and _plain(stage)):
            notes.append(f"{stage.name}: unchecked (an ensemble or OIP stage)")
            continue
        missing = sorted(
            f"{v.model}:{v.version}"
            for v in (*_all(before), *contract_variants(stage))
            if (v.model, v.version) not in contracts
        )
        if missing:
            more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
            notes.append(f"{stage.name}: unchecked (no contract for {', '.join(missing[:4])}{more})")
        else:
            notes.append(f"{stage.name}: checked against {before.name}")
    return notes
