"""Pipeline definitions as plain data <-> domain objects: the one validator (every problem, with its
field path) and the canonical plain form stored in Consul."""

from __future__ import annotations

import re
from dataclasses import asdict, replace
from typing import Any

from contract.headers import PRIORITIES
from contract.naming import LABEL, RULES, VERSION
from contract.payload import DEFAULT_MAX_BODY, MAX_BODY_CEILING, MIN_MAX_BODY
from controlplane.pipeline.model import (
    BRANCH_KEY,
    CONTRACT_TYPES,
    DEFAULT_BRANCH_ON,
    DEFAULT_RETRY_ATTEMPTS,
    DEFAULT_TIMEOUT_MS,
    FIELD_NAME,
    INTERNAL_TOPICS,
    LIMITS,
    MAX_INPUT_FIELDS,
    PROTOCOLS,
    RATE_KEYS_MAX,
    RATE_LIMIT_MAX,
    SHARE_WEIGHT_MAX,
    SHARES_MAX,
    TOPIC,
    TRANSPORTS,
    Branch,
    InvalidPipeline,
    Member,
    Pipeline,
    Problem,
    RateLimit,
    ReplayGate,
    Retry,
    Rollout,
    Shadow,
    Stage,
    Variant,
)

SIZE = re.compile(r"([0-9]{1,12})(Ki|Mi)?")
NUMBER = re.compile(r"-?[0-9]{1,4}")
HEADER_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
RESERVED_HEADERS = ("x-mll-", "x-envoy-")
SHARE_KEY = re.compile(r"[!-~]{1,64}")  # a weighed caller key: what a header value can hold, matched exactly
UNITS = {"": 1, "Ki": 1024, "Mi": 1024**2}


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
            self.bad(path, f"must be between {_shown(low)} and {_shown(high)}, got {_shown(value)}")
        return value

    def integer(self, value: Any, path: str, low: int, high: int, default: int) -> int:
        if value is not None and isinstance(value, float) and not value.is_integer():
            self.bad(path, "must be a whole number")
            return default
        return int(self.number(value, path, low, high, default))

    def label(self, value: Any, path: str) -> str:
        return self.text(value, path, LABEL, RULES[LABEL])

    def pipeline(self, spec: Any) -> Pipeline | None:
        allowed = {"name", "transport", "stages", "kind", "apiVersion", "input_topic", "output_topic", "logging"}
        allowed |= {"input", "max_body", "priority", "fairness", "rate_limit"}
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
        if transport == "kafka" and any(s.rollout or any(b.rollout for b in s.branches) for s in stages):
            self.bad("transport", "rollouts are judged from Envoy stats: use transport http or uds")
        if stages and stages[0].branches:
            self.bad("stages[0].branches", "the first stage has no previous stage to branch on")
        self.ensembles(stages, str(transport))
        topics = [self.topic(data.get(field_name), field_name) for field_name in ("input_topic", "output_topic")]
        if topics[0] and topics[0] == topics[1]:
            self.bad("output_topic", "must differ from input_topic (results would be read back as input)")
        log_percent = self.logging(data.get("logging"), str(transport))
        given = self.input(data.get("input"))
        max_body = self.size(data.get("max_body"), "max_body")
        priority, (fairness, shares) = self.priority(data.get("priority")), self.fairness(data.get("fairness"))
        if (priority or fairness) and transport == "kafka":
            self.bad(
                "priority" if priority else "fairness", "admission is at the runtimes' HTTP: use transport http or uds"
            )
        rate_limit = self.rate_limit(data.get("rate_limit"))
        return Pipeline(
            name,
            str(transport),
            stages,
            topics[0],
            topics[1],
            log_percent,
            given,
            max_body,
            priority,
            fairness,
            rate_limit,
            shares,
        )

    def rate_limit(self, raw: Any) -> RateLimit | None:
        """`rate_limit: {per_second: N, burst: M, keys: K}`: a quota per caller key at the gateway."""
        if raw is None:
            return None
        data = self.mapping(raw, "rate_limit", {"per_second", "burst", "keys"})
        if not data:
            return None
        if "per_second" not in data:
            self.bad("rate_limit.per_second", "required: requests a second each caller may send")
        per_second = self.integer(data.get("per_second"), "rate_limit.per_second", 1, RATE_LIMIT_MAX, 1)
        burst = self.integer(data.get("burst"), "rate_limit.burst", 1, RATE_LIMIT_MAX, per_second)
        if burst < per_second:
            self.bad("rate_limit.burst", f"must be at least per_second ({per_second}), got {burst}")
        keys = self.integer(data.get("keys"), "rate_limit.keys", 1, RATE_KEYS_MAX, RateLimit.keys)
        return RateLimit(per_second, burst, keys)

    def priority(self, raw: Any) -> int:
        """`priority: critical | standard | sheddable`, or a whole number from -1000 to 1000 (below 0: sheddable)."""
        if raw is None:
            return 0
        if isinstance(raw, str) and NUMBER.fullmatch(raw):
            raw = int(raw)  # the admin API's text form
        if isinstance(raw, str):
            if raw not in PRIORITIES:
                self.bad(
                    "priority", f"{raw[:40]!r} is not one of {', '.join(PRIORITIES)}, or a number from -1000 to 1000"
                )
            return PRIORITIES.get(raw, 0)
        return self.integer(raw, "priority", -1000, 1000, 0)

    def fairness(self, raw: Any) -> tuple[str, tuple[tuple[str, int], ...]]:
        """`fairness: {header: NAME, shares: {KEY: WEIGHT}}`: the caller's key for fair shares (default: the
        client's address), and keys weighed other than 1 (a key's share of a saturated model is its weight's)."""
        if raw is None:
            return "", ()
        data = self.mapping(raw, "fairness", {"header", "shares"})
        header = data.get("header")
        if not isinstance(header, str) or not HEADER_NAME.fullmatch(header) or header.startswith(RESERVED_HEADERS):
            self.bad(
                "fairness.header",
                f"a lower-case header name (a-z, 0-9, -; up to 64), not x-mll-* or x-envoy-*, got {str(header)[:40]!r}",
            )
            header = ""
        raw_shares = data.get("shares")
        if raw_shares is None:
            return header, ()
        if not isinstance(raw_shares, dict):
            self.bad("fairness.shares", f"must be a mapping of caller key to weight, got {type(raw_shares).__name__}")
            return header, ()
        if len(raw_shares) > SHARES_MAX:
            self.bad("fairness.shares", f"at most {SHARES_MAX} keys, got {len(raw_shares)}")
        shares = []
        for key, weight in sorted(raw_shares.items(), key=lambda item: str(item[0]))[:SHARES_MAX]:
            path = f"fairness.shares[{str(key)[:70]!r}]"
            if not isinstance(key, str) or not SHARE_KEY.fullmatch(key):
                self.bad(path, "a caller key is 1 to 64 visible ASCII characters (no space, no line break)")
                continue
            shares.append((key, self.integer(weight, path, 1, SHARE_WEIGHT_MAX, 1)))
        if shares and not header:
            self.bad("fairness.shares", "weighs values of fairness.header: name the header")
        return header, tuple(shares)

    def size(self, raw: Any, path: str) -> int:
        """A byte size: a whole number, or one with a binary unit (`512Ki`, `16Mi`), as Kubernetes writes them."""
        if raw is None:
            return DEFAULT_MAX_BODY
        found = SIZE.fullmatch(raw) if isinstance(raw, str) else None
        if isinstance(raw, bool) or not (isinstance(raw, int) or found):
            self.bad(path, f"a size in bytes, or with Ki or Mi (e.g. 16Mi), got {str(raw)[:40]!r}")
            return DEFAULT_MAX_BODY
        value = raw if isinstance(raw, int) else int(found[1]) * UNITS[found[2] or ""]  # type: ignore[index]
        if not MIN_MAX_BODY <= value <= MAX_BODY_CEILING:
            self.bad(path, f"between {MIN_MAX_BODY} bytes and {MAX_BODY_CEILING // 1024**2}Mi, got {value} bytes")
            return DEFAULT_MAX_BODY
        return value

    def input(self, raw: Any) -> tuple[tuple[str, str], ...]:
        """`input: {field: TYPE}`: what a caller's request holds (the first stage's contracts are checked)."""
        if raw is None:
            return ()
        data = self.mapping(raw, "input", set(map(str, raw)) if isinstance(raw, dict) else set())
        if len(data) > MAX_INPUT_FIELDS:
            self.bad("input", f"at most {MAX_INPUT_FIELDS} fields")
            return ()
        for name, kind in data.items():
            if not isinstance(name, str) or not 0 < len(name) <= 256 or not name.isprintable():
                self.bad("input", f"{str(name)[:40]!r}: a printable field name of 1 to 256 characters")
            elif kind not in CONTRACT_TYPES:
                self.bad(f"input.{name}", f"{str(kind)[:20]!r} is not one of {', '.join(CONTRACT_TYPES)}")
        return tuple(sorted((str(n), str(t)) for n, t in data.items()))  # canonical: a map has no order

    def logging(self, raw: Any, transport: str) -> float:
        """Payload logging: `logging: {percent: P}` (the records hold user data; README, Payload logging)."""
        if raw is None:
            return 0
        data = self.mapping(raw, "logging", {"percent"})
        percent = self.number(data.get("percent"), "logging.percent", 0, 100, 0)
        if percent and transport == "kafka":
            self.bad("logging", "payloads are logged by the first stage's runtime over HTTP: use transport http or uds")
        return float(percent)

    def ensembles(self, stages: tuple[Stage, ...], transport: str) -> None:
        """Who asks: the model sending into an ensemble or OIP stage asks it, so one must be there to do it."""
        for k, stage in enumerate(stages):
            if not stage.members and stage.protocol != "oip":
                continue
            where, what = (
                (f"stages[{k}].members", "an ensemble") if stage.members else (f"stages[{k}].protocol", "an OIP stage")
            )
            if transport == "kafka":
                self.bad(where, f"{what} is asked over HTTP: use transport http or uds")
            if k == 0:
                self.bad(
                    where, f"the first stage is called by the gateway, which cannot ask {what}: put a stage before it"
                )
            elif (stages[k - 1].members and not stages[k - 1].join) or stages[k - 1].protocol == "oip":
                self.bad(where, f"no model of ours sends into {what} here: put a stage (or a join) before it")

    def topic(self, value: Any, path: str) -> str:
        if not value:
            return ""
        topic = self.text(value, path, TOPIC, "a Kafka topic name: letters, digits, '.', '_', '-'")
        if topic in (".", ".."):
            self.bad(path, f"{topic!r} is not a usable Kafka topic name")
        elif topic.startswith(INTERNAL_TOPICS):
            self.bad(path, f"topics starting with {INTERNAL_TOPICS!r} are ML Lambda's own (hops, dead letters)")
        return topic

    def stage(self, raw: Any, path: str) -> Stage:
        allowed = {"name", "variants", "branches", "shadow", "timeout_ms", "retry", "branch_on", "rollout"}
        data = self.mapping(raw, path, allowed | {"members", "join", "protocol"})
        name = self.label(data.get("name"), f"{path}.name")
        variants, branches = self.split(data, path)
        timeout = self.integer(
            data.get("timeout_ms") or None,
            f"{path}.timeout_ms",
            1,
            LIMITS["timeout_ms"],
            DEFAULT_TIMEOUT_MS,
        )
        raw_members = self.items(data.get("members"), f"{path}.members", LIMITS["members"])
        members = tuple(self.member(m, f"{path}.members[{i}]", timeout) for i, m in enumerate(raw_members))
        self.unique([m.name for m in members], f"{path}.members", "member name")
        if sum(map(bool, (variants, branches, members))) != 1:
            self.bad(path, "needs exactly one of 'variants', 'branches' or 'members'")
        shadow = self.shadow(data["shadow"], f"{path}.shadow") if data.get("shadow") else None
        join = self.variant(data["join"], f"{path}.join", weighted=False) if data.get("join") else None
        for field_name, present in (("shadow", shadow), ("rollout", data.get("rollout"))):
            if members and present:
                self.bad(f"{path}.{field_name}", f"an ensemble's {field_name} goes in one of its members")
        if join and not members:
            self.bad(f"{path}.join", "only an ensemble (a stage with 'members') has a join")
        retry = self.retry(data.get("retry"), f"{path}.retry", timeout)
        branch_on = DEFAULT_BRANCH_ON
        if data.get("branch_on"):
            rule = "a field name: letters, digits, '_', '.', '-', up to 64"
            branch_on = self.text(data["branch_on"], f"{path}.branch_on", FIELD_NAME, rule)
        rollout = None
        if data.get("rollout") and not members:
            rollout = self.rollout(data["rollout"], f"{path}.rollout", variants)
        if rollout and rollout.min_agreement and shadow and shadow.cluster != rollout.candidate.cluster:
            self.bad(f"{path}.shadow", "a rollout with min_agreement shadows the stage with its candidate: no other")
        protocol = str(data.get("protocol") or "json")
        if protocol not in PROTOCOLS:
            self.bad(f"{path}.protocol", f"{protocol[:20]!r} is not one of {', '.join(PROTOCOLS)}")
        elif protocol == "oip" and members:
            self.bad(f"{path}.protocol", "an ensemble's members speak JSON; put an OIP model in a stage of its own")
        stage = Stage(name, variants, branches, shadow, timeout, retry, branch_on, rollout, members, join)
        return replace(stage, protocol=protocol)

    def split(self, data: dict[str, Any], path: str) -> tuple[tuple[Variant, ...], tuple[Branch, ...]]:
        """A stage's or member's variants, or its branches."""
        variants = self.variants(data.get("variants"), f"{path}.variants")
        raw_branches = self.items(data.get("branches"), f"{path}.branches", LIMITS["branches"])
        branches = tuple(self.branch(b, f"{path}.branches[{i}]") for i, b in enumerate(raw_branches))
        self.unique([b.key for b in branches], f"{path}.branches", "branch key")
        return variants, branches

    def member(self, raw: Any, path: str, stage_timeout_ms: int) -> Member:
        allowed = {"name", "variants", "branches", "shadow", "required", "timeout_ms"}
        data = self.mapping(raw, path, allowed)
        name = self.label(data.get("name"), f"{path}.name")
        variants, branches = self.split(data, path)
        if bool(variants) == bool(branches):
            self.bad(path, "needs exactly one of 'variants' or 'branches'")
        for b in branches:
            if b.rollout:
                self.bad(f"{path}.branches", "rollouts are not supported inside an ensemble")
        required = data.get("required", True)
        if not isinstance(required, bool):
            self.bad(f"{path}.required", f"must be true or false, got {type(required).__name__}")
        timeout = self.integer(
            data.get("timeout_ms") or None, f"{path}.timeout_ms", 1, stage_timeout_ms, stage_timeout_ms
        )
        shadow = self.shadow(data["shadow"], f"{path}.shadow") if data.get("shadow") else None
        return Member(name, variants, branches, shadow, required is not False, timeout)

    def rollout(self, raw: Any, path: str, variants: tuple[Variant, ...]) -> Rollout | None:
        fields = {"candidate", "steps", "step_seconds", "min_requests", "max_error_rate", "max_p99_ratio"}
        fields |= {"max_p99_ms", "step", "paused", "baseline", "require_replay", "min_agreement", "agreement_on"}
        fields |= {"max_drift"}
        data = self.mapping(raw, path, fields)
        if not data:
            return None
        if not variants:
            self.bad(path, "this stage has branches: put the rollout in the branch whose split it moves")
        candidate = self.variant(data.get("candidate"), f"{path}.candidate")
        steps = tuple(
            self.integer(x, f"{path}.steps[{i}]", 1, 100, 100)
            for i, x in enumerate(self.items(data.get("steps") or [5, 25, 50, 100], f"{path}.steps", 10))
        )
        if list(steps) != sorted(set(steps)) or (steps and steps[-1] != 100):
            self.bad(f"{path}.steps", f"percentages must rise and end at 100, got {list(steps)}")
        baseline = self.variants(data.get("baseline"), f"{path}.baseline")
        before = baseline or variants
        if candidate.cluster in {v.cluster for v in before}:
            self.bad(f"{path}.candidate", f"{candidate.model}:{candidate.version} already serves this stage")
        return Rollout(
            Variant(candidate.model, candidate.version),
            steps,
            self.integer(data.get("step_seconds") or None, f"{path}.step_seconds", 1, 3600, 30),
            self.integer(data.get("min_requests") or None, f"{path}.min_requests", 1, 1_000_000, 100),
            self.number(data.get("max_error_rate"), f"{path}.max_error_rate", 0, 1, 0.01),
            self.number(data.get("max_p99_ratio"), f"{path}.max_p99_ratio", 1, 100, 1.5),
            self.integer(data.get("max_p99_ms"), f"{path}.max_p99_ms", 0, LIMITS["timeout_ms"], 0),
            self.integer(data.get("step"), f"{path}.step", 0, len(steps), 0),
            bool(data.get("paused", False)),
            baseline,
            self.gate(data.get("require_replay"), f"{path}.require_replay"),
            *self.agreement(data, path),
            float(self.number(data.get("max_drift"), f"{path}.max_drift", 0, 100, 0)),
        )

    def agreement(self, data: dict[str, Any], path: str) -> tuple[float, str]:
        """`min_agreement` with the answer field it is judged on (`agreement_on`), or neither."""
        share = self.number(data.get("min_agreement"), f"{path}.min_agreement", 0, 1, 0)
        on = data.get("agreement_on", "")
        if share and not (isinstance(on, str) and FIELD_NAME.match(on)):
            self.bad(f"{path}.agreement_on", "the answer field agreement is judged on (e.g. category)")
        elif on and not share:
            self.bad(f"{path}.min_agreement", "agreement_on needs min_agreement (a share, e.g. 0.95)")
        return float(share), str(on) if share else ""

    def gate(self, raw: Any, path: str) -> ReplayGate | None:
        if raw is None:
            return None
        data = self.mapping(raw, path, {"max_changed", "max_failed"})
        return ReplayGate(
            self.number(data.get("max_changed"), f"{path}.max_changed", 0, 1, 0.05),
            self.number(data.get("max_failed"), f"{path}.max_failed", 0, 1, 0.0),
        )

    def variants(self, raw: Any, path: str) -> tuple[Variant, ...]:
        items = self.items(raw, path, LIMITS["variants"])
        variants = tuple(self.variant(v, f"{path}[{i}]") for i, v in enumerate(items))
        self.unique([v.cluster for v in variants], path, "model version")
        if variants and sum(v.weight for v in variants) <= 0:
            self.bad(path, "weights must add up to more than 0")
        return variants

    def variant(self, raw: Any, path: str, weighted: bool = True) -> Variant:
        data = self.mapping(raw, path, {"model", "version", "weight"} if weighted else {"model", "version"})
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
        data = self.mapping(raw, path, {"key", "variants", "rollout"})
        key = data.get("key")
        rule = "letters, digits, '_', '.', '-', up to 64"
        key_text = self.text(str(key) if isinstance(key, int) else key, f"{path}.key", BRANCH_KEY, rule)
        variants = self.variants(data.get("variants"), f"{path}.variants")
        if not variants:
            self.bad(f"{path}.variants", "a branch needs at least one variant")
        rollout = self.rollout(data["rollout"], f"{path}.rollout", variants) if data.get("rollout") else None
        if rollout and rollout.min_agreement:
            self.bad(f"{path}.rollout.min_agreement", "agreement is measured by a stage's shadow: a stage's rollout")
        return Branch(key_text, variants, rollout)

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
    stages = []
    for stage in pipeline.stages:
        out: dict[str, Any] = {"name": stage.name, **_split_dict(stage)}
        if stage.branches or stage.members:
            out["branch_on"] = stage.branch_on
        if stage.rollout:
            out["rollout"] = _rollout_dict(stage.rollout)
        if stage.members:
            out["members"] = [
                {"name": m.name, **_split_dict(m), "required": m.required, "timeout_ms": m.timeout_ms}
                for m in stage.members
            ]
        if stage.join:
            out["join"] = {"model": stage.join.model, "version": stage.join.version}
        if stage.protocol != "json":
            out["protocol"] = stage.protocol
        out["timeout_ms"] = stage.timeout_ms
        out["retry"] = asdict(stage.retry)
        stages.append(out)
    result: dict[str, Any] = {"name": pipeline.name, "transport": pipeline.transport, "stages": stages}
    for field_name in ("input_topic", "output_topic"):
        if getattr(pipeline, field_name):
            result[field_name] = getattr(pipeline, field_name)
    if pipeline.log_percent:
        result["logging"] = {"percent": pipeline.log_percent}
    if pipeline.input:
        result["input"] = dict(pipeline.input)
    if pipeline.max_body != DEFAULT_MAX_BODY:
        result["max_body"] = pipeline.max_body
    if pipeline.priority:
        names = {number: name for name, number in PRIORITIES.items()}
        result["priority"] = names.get(pipeline.priority, str(pipeline.priority))
    if pipeline.fairness_header:
        result["fairness"] = {"header": pipeline.fairness_header}
        if pipeline.fairness_shares:
            result["fairness"]["shares"] = dict(pipeline.fairness_shares)
    if pipeline.rate_limit:
        result["rate_limit"] = asdict(pipeline.rate_limit)
    return result


def _split_dict(holder: Stage | Member) -> dict[str, Any]:
    """A stage's or member's variants or branches, and its shadow."""
    out: dict[str, Any] = {}
    if holder.variants:
        out["variants"] = [asdict(v) for v in holder.variants]
    if holder.branches:
        out["branches"] = [
            {"key": b.key, "variants": [asdict(v) for v in b.variants]}
            | ({"rollout": _rollout_dict(b.rollout)} if b.rollout else {})
            for b in holder.branches
        ]
    if holder.shadow:
        out["shadow"] = asdict(holder.shadow)
    return out


def _rollout_dict(r: Rollout) -> dict[str, Any]:
    out: dict[str, Any] = {
        "candidate": {"model": r.candidate.model, "version": r.candidate.version},
        "steps": list(r.steps),
        "step_seconds": r.step_seconds,
        "min_requests": r.min_requests,
        "max_error_rate": r.max_error_rate,
        "max_p99_ratio": r.max_p99_ratio,
        "max_p99_ms": r.max_p99_ms,
        "step": r.step,
        "paused": r.paused,
    }
    if r.baseline:
        out["baseline"] = [asdict(v) for v in r.baseline]
    if r.require_replay:
        out["require_replay"] = asdict(r.require_replay)
    if r.min_agreement:
        out["min_agreement"], out["agreement_on"] = r.min_agreement, r.agreement_on
    if r.max_drift:
        out["max_drift"] = r.max_drift
    return out


def _shown(number: float) -> str:
    """1000000, not 1e+06; 0.5 as it is."""
    return str(int(number)) if float(number).is_integer() and abs(number) < 1e15 else f"{number:g}"
