"""Autoscaling policies and the decision: pure functions of what was observed, no I/O.

A policy is per model version: replicas between `min_replicas` and
`max_replicas`, aiming at `target_in_flight` requests in flight per replica
(and, optionally, a p99 latency). Every tick the control plane observes the
version's in-flight requests (summed over every Envoy that sends to it) and
turns it into a *recommendation*. The decision then follows the way the
Kubernetes HPA stabilises:

- up: the lowest recommendation over the last `up_window` seconds, so a spike
  shorter than the window moves nothing;
- down: the highest recommendation over the last `down_window` seconds, and
  only once that much has been observed, so replicas leave only after the
  load has stayed low for the whole window.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from contract.naming import LABEL, VERSION, model_cluster, name_problem

MAX_REPLICAS = 100
MAX_WINDOW = 3600.0  # seconds; bounds the recommendations kept per version
MAX_POLICIES = 256
TICK = 1.0  # seconds between observations
POLICY_KEYS = (
    "model",
    "version",
    "min_replicas",
    "max_replicas",
    "target_in_flight",
    "target_p99_ms",
    "up_window",
    "down_window",
)


@dataclass(frozen=True)
class Policy:
    model: str
    version: str
    min_replicas: int = 1
    max_replicas: int = 4
    target_in_flight: float = 4.0  # requests in flight per replica
    target_p99_ms: float | None = None  # also scale up while the recent p99 is above this
    up_window: float = 5.0  # seconds a higher recommendation must hold before replicas are added
    down_window: float = 60.0  # seconds the load must stay low before replicas leave

    @property
    def cluster(self) -> str:
        return model_cluster(self.model, self.version)

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))


class InvalidPolicy(ValueError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def parse_policy(raw: Any, where: str = "") -> Policy:
    """One policy from a mapping; every problem is named with its field path."""
    if not isinstance(raw, dict):
        raise InvalidPolicy([f"{where or 'autoscale'}: expected a mapping"])
    problems = [f"{where}{k}: unknown field (known: {', '.join(POLICY_KEYS)})" for k in raw if k not in POLICY_KEYS]
    for key, rule in (("model", LABEL), ("version", VERSION)):
        if not isinstance(raw.get(key), str):
            problems.append(f"{where}{key}: required (a string)")
        elif problem := name_problem(raw[key], rule):
            problems.append(f"{where}{key}: {problem}")

    def number(key: str, low: float, high: float, whole: bool = False, default: Any = None) -> Any:
        value = raw.get(key, default)
        if value is None:
            return None
        ok = type(value) is int if whole else type(value) in (int, float)
        if not ok or not low <= value <= high:
            kind = "a whole number" if whole else "a number"
            problems.append(f"{where}{key}: expected {kind} from {low:g} to {high:g}, got {str(value)[:40]!r}")
            return low
        return value

    low = number("min_replicas", 0, MAX_REPLICAS, True, Policy.min_replicas)  # 0: scale to zero when idle
    high = number("max_replicas", 1, MAX_REPLICAS, True, max(low, Policy.max_replicas))
    if high < low:
        problems.append(f"{where}max_replicas: {high} is below min_replicas {low}")
    policy = Policy(
        str(raw.get("model")),
        str(raw.get("version")),
        low,
        high,
        float(number("target_in_flight", 0.1, 10_000, default=Policy.target_in_flight)),
        number("target_p99_ms", 1, 600_000),
        float(number("up_window", 0, MAX_WINDOW, default=Policy.up_window)),
        float(number("down_window", 0, MAX_WINDOW, default=Policy.down_window)),
    )
    if problems:
        raise InvalidPolicy(problems)
    return policy


def load_policies(path: Path) -> tuple[Policy, ...]:
    """The control plane's `--autoscale FILE` (`kind: Autoscale`, `models: [...]`)."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise InvalidPolicy([f"cannot read {path}: {err.strerror}"]) from err
    except yaml.YAMLError as err:
        raise InvalidPolicy([f"{path} is not valid YAML: {str(err)[:200]}"]) from err
    if not isinstance(data, dict) or data.get("kind") != "Autoscale" or not isinstance(data.get("models"), list):
        raise InvalidPolicy([f"{path}: expected `kind: Autoscale` with a list under `models`"])
    if len(data["models"]) > MAX_POLICIES:
        raise InvalidPolicy([f"{path}: at most {MAX_POLICIES} policies, got {len(data['models'])}"])
    policies, problems = [], []
    for i, raw in enumerate(data["models"]):
        try:
            policies.append(parse_policy(raw, f"models[{i}]."))
        except InvalidPolicy as err:
            problems += err.problems
    seen = [p.cluster for p in policies]
    problems += [f"{c}: more than one policy" for c in sorted({c for c in seen if seen.count(c) > 1})]
    if problems:
        raise InvalidPolicy(problems)
    return tuple(policies)


def deployed_policy(model: str, version: str, fields: dict[str, Any]) -> Policy:
    """The policy of `mllambda deploy --autoscale` (a deploy record's fields); every problem named, as a file's."""
    policy = parse_policy({**fields, "model": model, "version": version}, "autoscale.")
    if policy.min_replicas == 0:
        zero = "scale to zero is a policy of the --autoscale file: its activator listens from the plane's start"
        raise InvalidPolicy([f"autoscale.min_replicas: at least 1 for a deploy ({zero})"])
    return policy


def policy_fields(policy: Policy) -> dict[str, Any]:
    """What a deploy record keeps of a policy: its fields but the model version it is recorded under."""
    return {k: getattr(policy, k) for k in POLICY_KEYS[2:] if getattr(policy, k) is not None}


def policies_document(policies: tuple[Policy, ...]) -> dict[str, Any]:
    """What `load_policies` reads (the stack writes this for its control plane)."""
    rows = [{k: getattr(p, k) for k in POLICY_KEYS if getattr(p, k) is not None} for p in policies]
    return {"kind": "Autoscale", "models": rows}


@dataclass(frozen=True)
class Observation:
    in_flight: float  # over every Envoy sending to the version
    passing: int  # replicas passing their checks
    p99_ms: float | None = None  # over Envoy's last stats interval
    active: bool = False  # requests arrived since the last observation (short ones never show in flight)
    refusing: bool = False  # some were refused (429/503): in_flight counts them as demand (scaler.demand_factor)


def recommend(policy: Policy, seen: Observation) -> tuple[int, str]:
    """How many replicas this observation asks for, and why (in words a person reads in `status`)."""
    wanted = math.ceil(seen.in_flight / policy.target_in_flight - 1e-9)
    demand = "in flight and refused" if seen.refusing else "in flight"
    reason = f"{seen.in_flight:.3g} {demand}, target {policy.target_in_flight:g} per replica"
    if wanted == 0 and seen.active:
        wanted, reason = 1, "requests arriving"
    target_p99 = policy.target_p99_ms
    if target_p99 and seen.p99_ms is not None and seen.passing and seen.p99_ms > target_p99:
        by_latency = math.ceil(seen.passing * seen.p99_ms / target_p99)
        if by_latency > wanted:
            wanted, reason = by_latency, f"p99 {seen.p99_ms:.0f} ms over the target {target_p99:g} ms"
    return policy.clamp(wanted), reason


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str


class Stabilizer:
    """The recommendations of one version over its longest window, and the decision they make."""

    def __init__(self, policy: Policy, started: float) -> None:
        self.policy = policy
        self.started = started
        kept = int(max(policy.up_window, policy.down_window) / TICK) + 2
        self._seen: deque[tuple[float, int, str]] = deque(maxlen=kept)

    def decide(self, now: float, current: int, seen: Observation) -> Decision | None:
        """A new replica count, or None to keep `current`."""
        wanted, reason = recommend(self.policy, seen)
        self._seen.append((now, wanted, reason))
        up = [(n, why) for at, n, why in self._seen if at >= now - self.policy.up_window]
        floor, why_up = min(up)
        if current == 0 and wanted > 0:  # a request is held for this replica: no window to wait out
            return Decision(wanted, f"up 0→{wanted}: cold start, {reason}")
        if floor > current:
            return Decision(floor, f"up {current}→{floor}: {why_up}")
        if current > self.policy.max_replicas or current < self.policy.min_replicas:
            fixed = self.policy.clamp(current)
            return Decision(fixed, f"{current}→{fixed}: outside {self.policy.min_replicas}..{self.policy.max_replicas}")
        if now - self.started < self.policy.down_window:
            return None  # not yet watched for a whole window: nobody leaves on a first impression
        down = [(n, why) for at, n, why in self._seen if at >= now - self.policy.down_window]
        ceiling, why_down = max(down)
        if ceiling < current:
            window = f"{self.policy.down_window:g} s"
            return Decision(ceiling, f"down {current}→{ceiling}: at most {why_down} over {window}")
        return None
