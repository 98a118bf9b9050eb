"""Progressive delivery, pure: where a stage's rollout goes next, judged from a window of Envoy stats.

A rollout moves a stage from its variants (the baseline) to a candidate in
steps (5 -> 25 -> 50 -> 100 percent by default). Each move is a new pipeline
version with its cause. In each step the driver (rollout_driver.py) watches the
candidate's requests since the step went live and decides:

- roll back when, over at least `min_requests`, the candidate's 5xx share is
  above `max_error_rate`, or its p99 is above `max_p99_ratio` times the
  baseline's (differences under LATENCY_SLACK_MS never count: Envoy's
  histogram buckets are that coarse there), or above `max_p99_ms`;
- otherwise, once the step has lasted `step_seconds` with at least
  `min_requests`, take the next step, or promote after the last one;
- else hold.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from controlplane.model import Pipeline, Rollout, Stage, Variant

LATENCY_SLACK_MS = 10.0  # Envoy's histogram buckets are 5-15 ms wide around there; a shared host adds as much
SCALE = 100  # weight units per percent: shares are exact in integer weights


@dataclass(frozen=True)
class Window:
    """What the candidate did since its current step went live."""

    requests: int
    errors: int
    seconds: float
    candidate_p99_ms: float | None = None
    baseline_p99_ms: float | None = None


@dataclass(frozen=True)
class Move:
    pipeline: Pipeline  # the next version
    cause: str


def label(p: Pipeline, stage: Stage) -> str:
    assert stage.rollout is not None
    c = stage.rollout.candidate
    return f"{p.name}/{stage.name} {c.model}:{c.version}"


def at_step(stage: Stage, step: int) -> Stage:
    """The stage with `step` live: the candidate gets steps[step-1] percent, the baseline the rest."""
    r = stage.rollout
    assert r is not None and 1 <= step <= len(r.steps)
    baseline = r.baseline or stage.variants
    share = r.steps[step - 1]
    total = sum(v.weight for v in baseline) or 1
    scaled = [replace(v, weight=round(v.weight * (100 - share) * SCALE / total)) for v in baseline]
    candidate = Variant(r.candidate.model, r.candidate.version, share * SCALE)
    return replace(stage, variants=(*scaled, candidate), rollout=replace(r, step=step, baseline=baseline))


def promoted(stage: Stage) -> Stage:
    assert stage.rollout is not None
    c = stage.rollout.candidate
    return replace(stage, variants=(Variant(c.model, c.version, 1),), rollout=None)


def rolled_back(stage: Stage) -> Stage:
    assert stage.rollout is not None
    return replace(stage, variants=stage.rollout.baseline or stage.variants, rollout=None)


def with_stage(p: Pipeline, k: int, stage: Stage) -> Pipeline:
    return replace(p, stages=(*p.stages[:k], stage, *p.stages[k + 1 :]))


def begin(p: Pipeline, k: int) -> Move:
    stage = p.stages[k]
    return _step(p, k, stage, 1)


def _step(p: Pipeline, k: int, stage: Stage, step: int) -> Move:
    r = stage.rollout
    assert r is not None
    cause = f"rollout {label(p, stage)} step {step}/{len(r.steps)} ({r.steps[step - 1]}%)"
    return Move(with_stage(p, k, at_step(stage, step)), cause)


def rollback(p: Pipeline, k: int, why: str, who: str = "auto-rollback") -> Move:
    stage = p.stages[k]
    return Move(with_stage(p, k, rolled_back(stage)), f"{who} {label(p, stage)}: {why}")


def promote(p: Pipeline, k: int, who: str = "rollout") -> Move:
    stage = p.stages[k]
    return Move(with_stage(p, k, promoted(stage)), f"{who} {label(p, stage)} promoted")


def problem(r: Rollout, window: Window) -> str | None:
    """Why the candidate fails its analysis in this window (None: it passes, or too few requests yet)."""
    if window.requests < r.min_requests:
        return None
    rate = window.errors / window.requests
    if rate > r.max_error_rate:
        return f"5xx {rate:.1%} > {r.max_error_rate:.1%} over {window.requests} requests"
    candidate, baseline = window.candidate_p99_ms, window.baseline_p99_ms
    if candidate is None:
        return None
    if r.max_p99_ms and candidate > r.max_p99_ms:
        return f"p99 {candidate:.0f} ms > {r.max_p99_ms} ms"
    if baseline and candidate - baseline > LATENCY_SLACK_MS and candidate / baseline > r.max_p99_ratio:
        return f"p99 {candidate / baseline:.1f}x baseline ({candidate:.0f} vs {baseline:.0f} ms) > {r.max_p99_ratio:g}x"
    return None


def judge(p: Pipeline, k: int, window: Window) -> Move | None:
    """The next move for stage k's rollout, or None to hold."""
    stage = p.stages[k]
    r = stage.rollout
    if r is None or r.paused:
        return None
    if r.step == 0:
        return begin(p, k)
    why = problem(r, window)
    if why is not None:
        return rollback(p, k, why)
    if window.requests >= r.min_requests and window.seconds >= r.step_seconds:
        return promote(p, k) if r.step == len(r.steps) else _step(p, k, stage, r.step + 1)
    return None


def user_move(p: Pipeline, k: int, action: str) -> Move:
    """`mllambda rollout pause|resume|promote|abort`: the same moves, caused by a person."""
    stage = p.stages[k]
    r = stage.rollout
    assert r is not None
    if action == "pause":
        return Move(
            with_stage(p, k, replace(stage, rollout=replace(r, paused=True))), f"rollout {label(p, stage)} paused"
        )
    if action == "resume":
        return Move(
            with_stage(p, k, replace(stage, rollout=replace(r, paused=False))), f"rollout {label(p, stage)} resumed"
        )
    if action == "promote":
        return promote(p, k, who="rollout (by hand)")
    return rollback(p, k, "aborted by hand", who="rollout aborted")
