"""Pipelines: the domain objects, and the one place they are validated.

A pipeline is a chain of stages. Each stage splits its traffic across model
variants by integer weight, or picks a branch by the routing key the previous
stage produced; it may mirror a share of its traffic to a shadow. Names end up
in Envoy resource names, HTTP headers, Kafka topics and Consul keys, so they
are held to DNS-label rules here, once, at the boundary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from contract.naming import LABEL, RULES, VERSION, model_cluster

TRANSPORTS = ("http", "uds", "kafka")
DEFAULT_TIMEOUT_MS = 10_000
DEFAULT_RETRY_ATTEMPTS = 2
LIMITS = {
    "stages": 32,
    "variants": 16,
    "branches": 64,
    "weight": 10_000,
    "timeout_ms": 300_000,
    "retry_attempts": 5,
}
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
DEFAULT_BRANCH_ON = "route_key"
INTERNAL_TOPICS = "mll."  # hop, input/output default, dead-letter and bridge topics (contract.naming)


@dataclass(frozen=True)
class Variant:
    model: str
    version: str
    weight: int = 1

    @property
    def cluster(self) -> str:
        """One Envoy cluster (and Consul service tag) per model version."""
        return model_cluster(self.model, self.version)


@dataclass(frozen=True)
class Shadow:
    model: str
    version: str
    percent: float

    @property
    def cluster(self) -> str:
        return model_cluster(self.model, self.version)


@dataclass(frozen=True)
class Branch:
    key: str
    variants: tuple[Variant, ...]


@dataclass(frozen=True)
class Retry:
    attempts: int = DEFAULT_RETRY_ATTEMPTS
    per_try_timeout_ms: int = 0  # 0: the stage timeout


@dataclass(frozen=True)
class Stage:
    name: str
    variants: tuple[Variant, ...] = ()
    branches: tuple[Branch, ...] = ()
    shadow: Shadow | None = None
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    retry: Retry = field(default_factory=Retry)
    branch_on: str = DEFAULT_BRANCH_ON  # field of the previous stage's output that picks the branch

    def groups(self) -> list[tuple[str, tuple[Variant, ...]]]:
        """Each split group: ("", variants) for a plain split, (branch key, variants) per branch."""
        found = [("", self.variants)] if self.variants else []
        return found + [(b.key, b.variants) for b in self.branches]

    def all_variants(self) -> tuple[Variant, ...]:
        return tuple(v for _, variants in self.groups() for v in variants)

    def models(self) -> set[tuple[str, str]]:
        found = {(v.model, v.version) for v in self.all_variants()}
        if self.shadow:
            found.add((self.shadow.model, self.shadow.version))
        return found


@dataclass(frozen=True)
class Pipeline:
    name: str
    transport: str
    stages: tuple[Stage, ...]
    input_topic: str = ""  # kafka: where requests come in (default mll.<name>.in)
    output_topic: str = ""  # kafka: where results go (default mll.<name>.out)

    def models(self) -> set[tuple[str, str]]:
        return {m for stage in self.stages for m in stage.models()}

    def timeout_ms(self, from_stage: int = 0) -> int:
        """What a call entering stage `from_stage` may take: calls are nested, so the rest of the chain."""
        return sum(stage.timeout_ms for stage in self.stages[from_stage:])


@dataclass(frozen=True)
class PipelineVersion:
    """One immutable, numbered version of a pipeline (a record in Consul KV)."""

    pipeline: Pipeline
    version: int
    created_at: str
    cause: str
    deleted: bool = False

    def to_record(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "spec": pipeline_to_dict(self.pipeline),
            "created_at": self.created_at,
            "cause": self.cause,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], deleted: bool = False) -> PipelineVersion:
        return cls(
            parse_pipeline(record["spec"]),
            int(record["version"]),
            str(record["created_at"]),
            str(record["cause"]),
            deleted,
        )


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class InvalidPipeline(ValueError):
    # The message travels as gRPC status details, which must stay well under
    # the 16 KiB metadata limit however hostile the input.
    SHOWN = 40

    def __init__(self, problems: list[Problem]) -> None:
        shown = [str(p) for p in problems[: self.SHOWN]]
        if len(problems) > self.SHOWN:
            shown.append(f"(and {len(problems) - self.SHOWN} more problems)")
        super().__init__("; ".join(shown))
        self.problems = problems


def check_name(name: Any, path: str = "name") -> str:
    """A pipeline name from any entry point (admin calls, CLI): the same rule as in a definition."""
    problems: list[Problem] = []
    _Parser(problems).label(name, path)
    if problems:
        raise InvalidPipeline(problems)
    return str(name)


def parse_pipeline(spec: Any) -> Pipeline:
    """Plain data (a YAML document or a protobuf as a dict) -> a valid Pipeline.

    Raises InvalidPipeline listing every problem found, each with its field path.
    """
    problems: list[Problem] = []
    pipeline = _Parser(problems).pipeline(spec)
    if problems or pipeline is None:
        raise InvalidPipeline(problems or [Problem("spec", "empty")])
    return pipeline


class _Parser:
    """Reads plain data into domain objects, collecting problems instead of stopping."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems

    def bad(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def mapping(self, value: Any, path: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.bad(path, f"must be a mapping, got {type(value).__name__}")
            return {}
        for key in sorted(set(map(str, value)) - allowed):
            self.bad(f"{path}.{key}", f"unknown field (allowed: {', '.join(sorted(allowed))})")
        return value

    def items(self, value: Any, path: str, limit: int) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.bad(path, f"must be a list, got {type(value).__name__}")
            return []
        if len(value) > limit:
            self.bad(path, f"at most {limit} entries, got {len(value)}")
            return value[:limit]
        return value

    def text(self, value: Any, path: str, pattern: re.Pattern[str], rule: str) -> str:
        if not isinstance(value, str) or not value:
            self.bad(path, "required" if value in (None, "") else "must be a string")
            return ""
        if not pattern.fullmatch(value):  # `$` alone would let a trailing newline through
            shown = value if len(value) <= 70 else value[:67] + "..."
            self.bad(path, f"{shown!r} is not valid: {rule}")
        return value

    def number(self, value: Any, path: str, low: float, high: float, default: float) -> float:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.bad(path, f"must be a number, got {type(value).__name__}")
            return default
        if not low <= value <= high:
            self.bad(path, f"must be between {low:g} and {high:g}, got {value:g}")
        return value

    def integer(self, value: Any, path: str, low: int, high: int, default: int) -> int:
        if value is not None and isinstance(value, float) and not value.is_integer():
            self.bad(path, "must be a whole number")
            return default
        return int(self.number(value, path, low, high, default))

    def label(self, value: Any, path: str) -> str:
        return self.text(value, path, LABEL, RULES[LABEL])

    def pipeline(self, spec: Any) -> Pipeline | None:
        allowed = {"name", "transport", "stages", "kind", "apiVersion", "input_topic", "output_topic"}
        data = self.mapping(spec, "spec", allowed)
        if not data:
            return None
        name = self.label(data.get("name"), "name")
        transport = data.get("transport") or "http"
        if transport not in TRANSPORTS:
            self.bad("transport", f"{transport!r} is not one of {', '.join(TRANSPORTS)}")
        raw_stages = self.items(data.get("stages"), "stages", LIMITS["stages"])
        if not raw_stages and not any(p.path == "stages" for p in self.problems):
            self.bad("stages", "a pipeline needs at least one stage")
        stages = tuple(self.stage(s, f"stages[{i}]") for i, s in enumerate(raw_stages))
        self.unique([s.name for s in stages], "stages", "stage name")
        if stages and stages[0].branches:
            self.bad("stages[0].branches", "the first stage has no previous stage to branch on")
        topics = [self.topic(data.get(field_name), field_name) for field_name in ("input_topic", "output_topic")]
        if topics[0] and topics[0] == topics[1]:
            self.bad("output_topic", "must differ from input_topic (results would be read back as input)")
        return Pipeline(name, str(transport), stages, topics[0], topics[1])

    def topic(self, value: Any, path: str) -> str:
        if not value:
            return ""
        topic = self.text(value, path, _TOPIC, "a Kafka topic name: letters, digits, '.', '_', '-'")
        if topic in (".", ".."):
            self.bad(path, f"{topic!r} is not a usable Kafka topic name")
        elif topic.startswith(INTERNAL_TOPICS):
            self.bad(path, f"topics starting with {INTERNAL_TOPICS!r} are ML Lambda's own (hops, dead letters)")
        return topic

    def stage(self, raw: Any, path: str) -> Stage:
        allowed = {"name", "variants", "branches", "shadow", "timeout_ms", "retry", "branch_on"}
        data = self.mapping(raw, path, allowed)
        name = self.label(data.get("name"), f"{path}.name")
        variants = self.variants(data.get("variants"), f"{path}.variants")
        raw_branches = self.items(data.get("branches"), f"{path}.branches", LIMITS["branches"])
        branches = tuple(self.branch(b, f"{path}.branches[{i}]") for i, b in enumerate(raw_branches))
        self.unique([b.key for b in branches], f"{path}.branches", "branch key")
        if bool(variants) == bool(branches):
            self.bad(path, "needs exactly one of 'variants' or 'branches'")
        shadow = self.shadow(data["shadow"], f"{path}.shadow") if data.get("shadow") else None
        timeout = self.integer(
            data.get("timeout_ms") or None,
            f"{path}.timeout_ms",
            1,
            LIMITS["timeout_ms"],
            DEFAULT_TIMEOUT_MS,
        )
        retry = self.retry(data.get("retry"), f"{path}.retry", timeout)
        branch_on = DEFAULT_BRANCH_ON
        if data.get("branch_on"):
            rule = "a field name: letters, digits, '_', '.', '-', up to 64"
            branch_on = self.text(data["branch_on"], f"{path}.branch_on", _FIELD, rule)
        return Stage(name, variants, branches, shadow, timeout, retry, branch_on)

    def variants(self, raw: Any, path: str) -> tuple[Variant, ...]:
        items = self.items(raw, path, LIMITS["variants"])
        variants = tuple(self.variant(v, f"{path}[{i}]") for i, v in enumerate(items))
        self.unique([v.cluster for v in variants], path, "model version")
        if variants and sum(v.weight for v in variants) <= 0:
            self.bad(path, "weights must add up to more than 0")
        return variants

    def variant(self, raw: Any, path: str) -> Variant:
        data = self.mapping(raw, path, {"model", "version", "weight"})
        return Variant(
            self.label(data.get("model"), f"{path}.model"),
            self.version(data.get("version"), f"{path}.version"),
            self.integer(data.get("weight"), f"{path}.weight", 0, LIMITS["weight"], 1),
        )

    def version(self, value: Any, path: str) -> str:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)  # YAML reads `version: 2` as a number
        return self.text(value, path, VERSION, RULES[VERSION])

    def branch(self, raw: Any, path: str) -> Branch:
        data = self.mapping(raw, path, {"key", "variants"})
        key = data.get("key")
        rule = "letters, digits, '_', '.', '-', up to 64"
        key_text = self.text(str(key) if isinstance(key, int) else key, f"{path}.key", _KEY, rule)
        variants = self.variants(data.get("variants"), f"{path}.variants")
        if not variants:
            self.bad(f"{path}.variants", "a branch needs at least one variant")
        return Branch(key_text, variants)

    def shadow(self, raw: Any, path: str) -> Shadow:
        data = self.mapping(raw, path, {"model", "version", "percent"})
        if data.get("percent") is None:
            self.bad(f"{path}.percent", "required")
        return Shadow(
            self.label(data.get("model"), f"{path}.model"),
            self.version(data.get("version"), f"{path}.version"),
            self.number(data.get("percent"), f"{path}.percent", 0.0001, 100, 100),
        )

    def retry(self, raw: Any, path: str, timeout_ms: int) -> Retry:
        if raw is None:
            return Retry()
        data = self.mapping(raw, path, {"attempts", "per_try_timeout_ms"})
        attempts = self.integer(
            data.get("attempts"),
            f"{path}.attempts",
            0,
            LIMITS["retry_attempts"],
            DEFAULT_RETRY_ATTEMPTS,
        )
        per_try_path = f"{path}.per_try_timeout_ms"
        per_try = self.integer(data.get("per_try_timeout_ms"), per_try_path, 0, timeout_ms, 0)
        return Retry(attempts, per_try)

    def unique(self, values: list[str], path: str, what: str) -> None:
        seen: set[str] = set()
        for value in values:
            if value and value in seen:
                self.bad(path, f"duplicate {what} {value!r}")
            seen.add(value)


def pipeline_to_dict(pipeline: Pipeline) -> dict[str, Any]:
    """The canonical plain form (stored in Consul, shown by `get -o yaml`)."""

    def variants(items: tuple[Variant, ...]) -> list[dict[str, Any]]:
        return [{"model": v.model, "version": v.version, "weight": v.weight} for v in items]

    stages = []
    for stage in pipeline.stages:
        out: dict[str, Any] = {"name": stage.name}
        if stage.variants:
            out["variants"] = variants(stage.variants)
        if stage.branches:
            out["branches"] = [{"key": b.key, "variants": variants(b.variants)} for b in stage.branches]
            out["branch_on"] = stage.branch_on
        if stage.shadow:
            s = stage.shadow
            out["shadow"] = {"model": s.model, "version": s.version, "percent": s.percent}
        out["timeout_ms"] = stage.timeout_ms
        out["retry"] = {
            "attempts": stage.retry.attempts,
            "per_try_timeout_ms": stage.retry.per_try_timeout_ms,
        }
        stages.append(out)
    result: dict[str, Any] = {"name": pipeline.name, "transport": pipeline.transport, "stages": stages}
    for field_name in ("input_topic", "output_topic"):
        if getattr(pipeline, field_name):
            result[field_name] = getattr(pipeline, field_name)
    return result
