"""Pipelines: the domain objects and the rules their names follow (spec.py validates a definition against them).

A pipeline is a chain of stages. Each stage splits its traffic across model
variants by integer weight, or picks a branch by the routing key the previous
stage produced; it may mirror a share of its traffic to a shadow. Names end up
in Envoy resource names, HTTP headers, Kafka topics and Consul keys, so they
are held to DNS-label rules here, once, at the boundary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from contract.naming import model_cluster
from contract.payload import DEFAULT_MAX_BODY

TRANSPORTS = ("http", "uds", "kafka")
PROTOCOLS = ("json", "oip")  # how a stage's models are called: our JSON hop, or the Open Inference Protocol
# A field's type in a contract (a model version's, or a pipeline's declared input): OIP's datatypes, or ANY.
CONTRACT_TYPES = (
    *("BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"),
    *("FP16", "FP32", "FP64", "BYTES", "ANY"),
)
MAX_INPUT_FIELDS = 256
DEFAULT_TIMEOUT_MS = 10_000
DEFAULT_RETRY_ATTEMPTS = 2
LIMITS = {
    "stages": 32,
    "variants": 16,
    "branches": 64,
    "weight": 10_000,
    "timeout_ms": 300_000,
    "retry_attempts": 5,
    "members": 8,  # contract.fanout.MAX_MEMBERS
}
BRANCH_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
DEFAULT_BRANCH_ON = "route_key"
JOIN_GROUP = "(join)"  # an ensemble's join, among its split groups
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


AGREEMENT_PERCENT = 20.0  # of a stage's requests mirrored to a rollout's candidate while agreement is measured


@dataclass(frozen=True)
class ReplayGate:
    """A rollout's first step waits for a replay of its candidate within these shares (controlplane/delivery)."""

    max_changed: float = 0.05  # of the replayed requests whose answers changed
    max_failed: float = 0.0


@dataclass(frozen=True)
class Rollout:
    """A stage's traffic moved to a candidate in steps, each judged from Envoy stats (rollouts.py).

    The user writes the candidate, the steps and the limits; the driving control
    plane moves `step` (0: not begun; k: steps[k-1] percent live) and records the
    stage's variants from before the rollout in `baseline`, one version per move.
    """

    candidate: Variant
    steps: tuple[int, ...] = (5, 25, 50, 100)
    step_seconds: int = 30
    min_requests: int = 100
    max_error_rate: float = 0.01  # the candidate's 5xx share in the step's window
    max_p99_ratio: float = 1.5  # the candidate's p99 over the baseline's
    max_p99_ms: int = 0  # 0: no absolute limit
    step: int = 0
    paused: bool = False
    baseline: tuple[Variant, ...] = ()
    require_replay: ReplayGate | None = None  # before step 1: a passing replay that names the candidate
    # before step 1: the candidate shadows the stage (AGREEMENT_PERCENT of requests) until min_requests of them
    # are paired; it goes on if it answered `agreement_on` as the baseline did on at least this share (0: no check)
    min_agreement: float = 0.0
    agreement_on: str = ""
    # in every step: the candidate's answers against the baseline's over the last minute, field by field (PSI of
    # their profiles); above this, it is rolled back (0: no check)
    max_drift: float = 0.0


@dataclass(frozen=True)
class Branch:
    key: str
    variants: tuple[Variant, ...]
    rollout: Rollout | None = None


@dataclass(frozen=True)
class Member:
    """One model of an ensemble stage: asked at the same time as the others, with its own split and shadow.

    Its variants split by weight (or its branches by the stage's `branch_on`)
    as a stage's do. A required member's failure fails the request; an optional
    one's (an error, or no answer within `timeout_ms`) leaves it out, marked.
    """

    name: str
    variants: tuple[Variant, ...] = ()
    branches: tuple[Branch, ...] = ()
    shadow: Shadow | None = None
    required: bool = True
    timeout_ms: int = DEFAULT_TIMEOUT_MS

    def groups(self) -> list[tuple[str, tuple[Variant, ...]]]:
        found = [("", self.variants)] if self.variants else []
        return found + [(b.key, b.variants) for b in self.branches]


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
    rollout: Rollout | None = None
    members: tuple[Member, ...] = ()  # an ensemble: every member asked at once, answers merged by name
    join: Variant | None = None  # an ensemble's model that gets the merged answers (None: they go on as they are)
    protocol: str = "json"  # "oip": its models answer OIP and never forward; the model before sends their answer on

    def groups(self) -> list[tuple[str, tuple[Variant, ...]]]:
        """Each split group: ("", variants) for a plain split, (branch key, variants) per branch;
        for an ensemble, ("<member>" or "<member>/<branch key>", variants) per member, then ("(join)", join)."""
        found = [("", self.variants)] if self.variants else []
        found += [(b.key, b.variants) for b in self.branches]
        for m in self.members:
            found += [(f"{m.name}/{key}" if key else m.name, variants) for key, variants in m.groups()]
        return found + ([(JOIN_GROUP, (self.join,))] if self.join else [])

    def all_variants(self) -> tuple[Variant, ...]:
        return tuple(v for _, variants in self.groups() for v in variants)

    def shadows(self) -> list[tuple[str, Shadow]]:
        """("", the stage's shadow) or (member name, its shadow) for each shadow."""
        found = [("", self.shadow)] if self.shadow else []
        return found + [(m.name, m.shadow) for m in self.members if m.shadow]

    def clusters(self) -> set[str]:
        """Every model version this stage sends requests to (variants, members, join, shadows)."""
        return {v.cluster for v in self.all_variants()} | {s.cluster for _, s in self.shadows()}

    def compared(self) -> list[tuple[str, frozenset[str], bool]]:
        """Whose answers model monitoring pairs with whose, by request id (agreement): (a model version's
        cluster, the clusters it is compared with, whether only the fields both answer count). A shadow against
        the variants it shadows (every field of theirs: one it leaves out disagrees); an ensemble member against
        the join (the fields both answer: members answer parts) and a member's shadow against that member."""
        found = (
            [(self.shadow.cluster, frozenset(v.cluster for v in self.all_variants()), False)]
            if (self.shadow and not self.members)
            else []
        )
        for m in self.members:
            mine = frozenset(v.cluster for _, variants in m.groups() for v in variants)
            if self.join is not None:
                found += [(c, frozenset({self.join.cluster}), True) for c in sorted(mine)]
            if m.shadow is not None:
                found.append((m.shadow.cluster, mine, False))
        return found

    def models(self) -> set[tuple[str, str]]:
        found = {(v.model, v.version) for v in self.all_variants()}
        for rollout in [self.rollout, *(b.rollout for b in self.branches)]:
            if rollout:
                found.add((rollout.candidate.model, rollout.candidate.version))
        return found | {(s.model, s.version) for _, s in self.shadows()}


@dataclass(frozen=True)
class RateLimit:
    """A quota per caller at each gateway Envoy (Envoy's local rate limit, a token bucket per caller key):
    `per_second` requests a second, `burst` at once; at most `keys` callers tracked at a time (the least
    recently seen is forgotten first, and comes back with a full bucket)."""

    per_second: int
    burst: int
    keys: int = 10_000


SHARES_MAX = 32  # caller keys a pipeline weighs (each one its own routes at the gateway)
SHARE_WEIGHT_MAX = 100  # a key's weight (runtime_sdk.admission.MAX_WEIGHT)
RATE_LIMIT_MAX = 1_000_000  # per_second and burst
RATE_KEYS_MAX = 100_000  # callers an Envoy tracks per pipeline


@dataclass(frozen=True)
class Pipeline:
    name: str
    transport: str
    stages: tuple[Stage, ...]
    input_topic: str = ""  # kafka: where requests come in (default mll.<name>.in)
    output_topic: str = ""  # kafka: where results go (default mll.<name>.out)
    log_percent: float = 0  # payload logging: this share of requests recorded by the first stage (0: off)
    input: tuple[tuple[str, str], ...] = ()  # (field, type) a caller's request holds; the first stage is checked
    max_body: int = DEFAULT_MAX_BODY  # bytes of a request (and of each stage's answer): 413 at the gateway over it
    priority: int = 0  # when its models are saturated: above 0 served first, below 0 refused first (admission.py)
    fairness_header: str = ""  # the request header whose value is the caller's key ("": the client's address)
    rate_limit: RateLimit | None = None  # a quota per caller key, at the gateway (None: none)
    fairness_shares: tuple[tuple[str, int], ...] = ()  # (key, weight): callers weighed other than 1, sorted by key

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
