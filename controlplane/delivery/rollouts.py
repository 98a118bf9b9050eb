"""Progressive delivery, pure: where a rollout goes next, judged from a window of Envoy stats.

A rollout moves one split — a stage's variants, or one branch's — from its
variants (the baseline) to a candidate in
steps (5 -> 25 -> 50 -> 100 percent by default). Each move is a new pipeline
version with its cause. In each step the driver (rollout_driver.py) watches the
candidate's requests since the step went live and decides:

- roll back when, over at least `min_requests`, the candidate's 5xx share is
  above `max_error_rate`, or its p99 is above `max_p99_ratio` times the
  baseline's over the same seconds (Envoy's last stats interval; differences
  under LATENCY_SLACK_MS never count: Envoy's histogram buckets are that coarse
  there), or above `max_p99_ms`;
- otherwise, once the step has lasted `step_seconds` with at least
  `min_requests`, take the next step, or promote after the last one;
- else hold.

A rollout with `min_agreement` first has its candidate shadow the stage
(AGREEMENT_PERCENT of requests, written as a version): once `min_requests` of
them have been answered by both, it begins if the candidate answered
`agreement_on` as the baseline did on at least that share, else rolls back.

A rollout with `require_replay` takes its first step only after a replay
(`mllambda replay`, replays.py) whose candidate names the rollout's candidate:
the newest such report within the gate's shares lets it begin (the step's cause
names the report), one outside them rolls it back; without one it waits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from controlplane.delivery.replay_report import passes
from controlplane.pipeline.model import AGREEMENT_PERCENT, Pipeline, Rollout, Shadow, Variant

LATENCY_SLACK_MS = 10.0  # Envoy's histogram buckets are 5-15 ms wide around there; a shared host adds as much
SCALE = 100  # weight units per percent: shares are exact in integer weights


@dataclass(frozen=True)
class Window:
    """What the candidate did since its current step went live."""

    requests: int
    errors: int
    seconds: float
    candidate_p99_ms: float | None = None  # both over Envoy's last stats interval (5 s): the same seconds
    baseline_p99_ms: float | None = None
    output_drift: tuple[str, float] | None = None  # the candidate's answers against the baseline's: (field, PSI)


Spot = tuple[int, str]  # (stage index, branch key); "" for the stage's own split
Variants = tuple[Variant, ...]


@dataclass(frozen=True)
class Move:
    pipeline: Pipeline  # the next version
    cause: str


def spots(p: Pipeline) -> list[Spot]:
    """Every split with a rollout, in order."""
    found: list[Spot] = []
    for k, stage in enumerate(p.stages):
        found += [(k, "")] if stage.rollout else []
        found += [(k, b.key) for b in stage.branches if b.rollout]
    return found


def where(p: Pipeline, spot: Spot) -> tuple[Variants, Rollout | None]:
    stage = p.stages[spot[0]]
    if not spot[1]:
        return stage.variants, stage.rollout
    branch = next(b for b in stage.branches if b.key == spot[1])
    return branch.variants, branch.rollout


def put(p: Pipeline, spot: Spot, variants: Variants, rollout: Rollout | None) -> Pipeline:
    k, key = spot
    stage = p.stages[k]
    if key:
        branches = tuple(replace(b, variants=variants, rollout=rollout) if b.key == key else b for b in stage.branches)
        stage = replace(stage, branches=branches)
    else:
        stage = replace(stage, variants=variants, rollout=rollout)
    return replace(p, stages=(*p.stages[:k], stage, *p.stages[k + 1 :]))


def state(r: Rollout) -> str:
    """Where a rollout is, in words (for the dashboard and `describe`)."""
    if r.paused:
        return "paused"
    if r.step == 0:
        waits = ["a passing replay"] if r.require_replay else []
        waits += [f"agreement on {r.agreement_on}"] if r.min_agreement else []
        return f"waiting for {' and '.join(waits)}" if waits else "not begun"
    return f"step {r.step}/{len(r.steps)}"


def label(p: Pipeline, spot: Spot) -> str:
    _, r = where(p, spot)
    assert r is not None
    branch = f"[{spot[1]}]" if spot[1] else ""
    return f"{p.name}/{p.stages[spot[0]].name}{branch} {r.candidate.model}:{r.candidate.version}"


def at_step(variants: Variants, r: Rollout, step: int) -> tuple[Variants, Rollout]:
    """`step` live: the candidate gets steps[step-1] percent, the baseline the rest."""
    assert 1 <= step <= len(r.steps)
    baseline = r.baseline or variants
    share = r.steps[step - 1]
    total = sum(v.weight for v in baseline) or 1
    scaled = [replace(v, weight=round(v.weight * (100 - share) * SCALE / total)) for v in baseline]
    candidate = Variant(r.candidate.model, r.candidate.version, share * SCALE)
    return (*scaled, candidate), replace(r, step=step, baseline=baseline)


def _rollout(p: Pipeline, spot: Spot) -> tuple[Variants, Rollout]:
    variants, r = where(p, spot)
    assert r is not None
    return variants, r


def step_to(p: Pipeline, spot: Spot, step: int) -> Move:
    variants, r = _rollout(p, spot)
    cause = f"rollout {label(p, spot)} step {step}/{len(r.steps)} ({r.steps[step - 1]}%)"
    return Move(put(p, spot, *at_step(variants, r, step)), cause)


def rollback(p: Pipeline, spot: Spot, why: str, who: str = "auto-rollback") -> Move:
    variants, r = _rollout(p, spot)
    return Move(_unshadowed(put(p, spot, r.baseline or variants, None), spot, r), f"{who} {label(p, spot)}: {why}")


def _shadowed(p: Pipeline, spot: Spot, r: Rollout) -> Pipeline:
    """The stage with the candidate as its shadow, to measure their agreement."""
    shadow = Shadow(r.candidate.model, r.candidate.version, AGREEMENT_PERCENT)
    stages = list(p.stages)
    stages[spot[0]] = replace(stages[spot[0]], shadow=shadow)
    return replace(p, stages=tuple(stages))


def _unshadowed(p: Pipeline, spot: Spot, r: Rollout) -> Pipeline:
    """Without the shadow a rollout put there (its candidate's) to measure agreement."""
    stage = p.stages[spot[0]]
    if stage.shadow is None or stage.shadow.cluster != r.candidate.cluster:
        return p
    stages = list(p.stages)
    stages[spot[0]] = replace(stage, shadow=None)
    return replace(p, stages=tuple(stages))


def promote(p: Pipeline, spot: Spot, who: str = "rollout") -> Move:
    _, r = _rollout(p, spot)
    only = (Variant(r.candidate.model, r.candidate.version, 1),)
    return Move(put(p, spot, only, None), f"{who} {label(p, spot)} promoted")


def problem(r: Rollout, window: Window) -> str | None:
    """Why the candidate fails its analysis in this window (None: it passes, or too few requests yet)."""
    if window.requests < r.min_requests:
        return None
    rate = window.errors / window.requests
    if rate > r.max_error_rate:
        return f"5xx {rate:.1%} > {r.max_error_rate:.1%} over {window.requests} requests"
    candidate, baseline = window.candidate_p99_ms, window.baseline_p99_ms
    if candidate is not None and r.max_p99_ms and candidate > r.max_p99_ms:
        return f"p99 {candidate:.0f} ms > {r.max_p99_ms} ms"
    if candidate is not None and baseline and candidate - baseline > LATENCY_SLACK_MS:
        if candidate / baseline > r.max_p99_ratio:
            ratio = f"{candidate / baseline:.1f}x baseline ({candidate:.0f} vs {baseline:.0f} ms)"
            return f"p99 {ratio} > {r.max_p99_ratio:g}x"
    if r.max_drift and window.output_drift is not None and window.output_drift[1] > r.max_drift:
        field, psi = window.output_drift
        return f"its answers' {field} drift from the baseline's: PSI {psi:.2f} > {r.max_drift:g}"
    return None


def replay_of(r: Rollout, reports: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The newest replay report (reports: newest first) whose candidate served the rollout's candidate."""
    wanted = f"{r.candidate.model}:{r.candidate.version}"
    return next((x for x in reports if wanted in (x.get("candidate_models") or ())), None)


Agreement = tuple[int, float]  # (requests both answered, the share the candidate answered as the baseline)


def _gate(
    p: Pipeline, spot: Spot, r: Rollout, reports: Sequence[Mapping[str, Any]], agreement: Agreement | None
) -> Move | None:
    """Step 1 once every gate passed (a replay, agreement); a failed one rolls back; one still open: hold."""
    passed = []
    gate = r.require_replay
    if gate is not None:
        report = replay_of(r, reports)
        if report is None:
            return None
        changed, failed = float(report.get("changed_share", 1)), float(report.get("failed_share", 1))
        about = f"replay {report.get('id')}: {changed:.1%} changed, {failed:.1%} failed"
        if not passes(report, gate.max_changed, gate.max_failed):
            limits = f"(at most {gate.max_changed:.1%} and {gate.max_failed:.1%})"
            return rollback(p, spot, f"{about} {limits}")
        passed.append(about)
    if r.min_agreement:
        shadow = p.stages[spot[0]].shadow
        if shadow is None or shadow.cluster != r.candidate.cluster:
            why = f"measuring agreement on {r.agreement_on} (the candidate shadows {AGREEMENT_PERCENT:g}% of requests)"
            return Move(_shadowed(p, spot, r), f"rollout {label(p, spot)}: {why}")
        if agreement is None or agreement[0] < r.min_requests:
            return None
        pairs, share = agreement
        about = f"agreement on {r.agreement_on} {share:.1%} over {pairs} requests"
        if share < r.min_agreement:
            return rollback(p, spot, f"{about} < {r.min_agreement:.1%}")
        passed.append(about)
    move = step_to(_unshadowed(p, spot, r), spot, 1)
    return replace(move, cause=f"{move.cause} after {'; '.join(passed)}") if passed else move


def judge(
    p: Pipeline,
    spot: Spot,
    window: Window,
    replays: Sequence[Mapping[str, Any]] = (),
    agreement: Agreement | None = None,
) -> Move | None:
    """The next move for the rollout at `spot`, or None to hold (`replays`: the pipeline's reports, newest first;
    `agreement`: the candidate's with the baseline as its shadow, on the rollout's field)."""
    _, r = where(p, spot)
    if r is None or r.paused:
        return None
    if r.step == 0:
        return _gate(p, spot, r, replays, agreement)
    why = problem(r, window)
    if why is not None:
        return rollback(p, spot, why)
    if window.requests >= r.min_requests and window.seconds >= r.step_seconds:
        return promote(p, spot) if r.step == len(r.steps) else step_to(p, spot, r.step + 1)
    return None


def user_move(p: Pipeline, spot: Spot, action: str) -> Move:
    """`mllambda rollout pause|resume|promote|abort`: the same moves, caused by a person."""
    variants, r = _rollout(p, spot)
    if action in ("pause", "resume"):
        paused = put(p, spot, variants, replace(r, paused=action == "pause"))
        return Move(paused, f"rollout {label(p, spot)} {action}d")
    if action == "promote":
        return promote(p, spot, who="rollout (by hand)")
    return rollback(p, spot, "aborted by hand", who="rollout aborted")
