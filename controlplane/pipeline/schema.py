"""A JSON Schema of pipeline definitions, for editors (completion and checks as you type).

Built from the validator's own constants (name rules, limits, transports), so it cannot
drift from them; docs/schemas/pipeline.schema.json is this, written out (tests/test_schemas.py
checks that it is current). The schema says the shape; the validator (spec.py) stays the
judge of what needs the whole document (unique names, weights that add up, who asks an
ensemble) and of Envoy's own rules.
"""

from __future__ import annotations

from typing import Any

from contract.headers import PRIORITIES
from contract.naming import LABEL, RULES, VERSION
from contract.payload import MAX_BODY_CEILING, MIN_MAX_BODY
from controlplane.pipeline.model import (
    BRANCH_KEY,
    CONTRACT_TYPES,
    FIELD_NAME,
    LIMITS,
    MAX_INPUT_FIELDS,
    PROTOCOLS,
    RATE_KEYS_MAX,
    RATE_LIMIT_MAX,
    SHARE_WEIGHT_MAX,
    SHARES_MAX,
    TOPIC,
    TRANSPORTS,
)

SCHEMA = "https://json-schema.org/draft/2020-12/schema"


def anchored(pattern: str) -> str:
    """JSON Schema patterns search; the validator's match whole strings. Not `$` at the end: in Python (which
    checks these in the tests) it also matches before a final newline, so `(?![\\s\\S])`: nothing follows."""
    return "^(?:" + pattern.strip("^$") + r")(?![\s\S])"


# A JSON object with exactly these fields: an editor flags a misspelt key, as the validators do.
def closed_object(properties: dict[str, Any], required: tuple[str, ...] = (), **more: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
        **more,
    }


def pipeline_schema() -> dict[str, Any]:
    label = {"type": "string", "pattern": anchored(LABEL.pattern), "description": RULES[LABEL]}
    version = {
        "anyOf": [{"type": "string", "pattern": anchored(VERSION.pattern)}, {"type": "number"}],
        "description": RULES[VERSION],
    }
    timeout = {"type": "integer", "minimum": 1, "maximum": LIMITS["timeout_ms"]}
    weight = {"type": "integer", "minimum": 0, "maximum": LIMITS["weight"], "default": 1}
    variant = closed_object({"model": label, "version": version, "weight": weight}, ("model", "version"))
    variants = {"type": "array", "items": {"$ref": "#/$defs/variant"}, "maxItems": LIMITS["variants"]}
    shadow = closed_object(
        {"model": label, "version": version, "percent": {"type": "number", "exclusiveMinimum": 0, "maximum": 100}},
        ("model", "version", "percent"),
    )
    share = {"type": "number", "minimum": 0, "maximum": 1}
    rollout = closed_object(
        {
            "candidate": closed_object({"model": label, "version": version}, ("model", "version")),
            "steps": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 100}, "maxItems": 10},
            "step_seconds": {"type": "integer", "minimum": 1, "maximum": 3600},
            "min_requests": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
            "max_error_rate": {"type": "number", "minimum": 0, "maximum": 1},
            "max_p99_ratio": {"type": "number", "minimum": 1, "maximum": 100},
            "max_p99_ms": {"type": "integer", "minimum": 0, "maximum": LIMITS["timeout_ms"]},
            "step": {"type": "integer", "minimum": 0},
            "paused": {"type": "boolean"},
            "baseline": variants,
            "require_replay": closed_object({"max_changed": share, "max_failed": share}),
            "min_agreement": share,
            "max_drift": {"type": "number", "minimum": 0, "maximum": 100},
            "agreement_on": {"type": "string", "pattern": anchored(FIELD_NAME.pattern)},
        },
        ("candidate",),
    )
    branch = closed_object(
        {
            "key": {"type": ["string", "integer"], "pattern": anchored(BRANCH_KEY.pattern)},
            "variants": variants,
            "rollout": rollout,
        },
        ("key", "variants"),
    )
    branches = {"type": "array", "items": {"$ref": "#/$defs/branch"}, "maxItems": LIMITS["branches"]}
    member = closed_object(
        {
            "name": label,
            "variants": variants,
            "branches": branches,
            "shadow": shadow,
            "required": {"type": "boolean"},
            "timeout_ms": timeout,
        },
        ("name",),
    )
    retry = closed_object(
        {
            "attempts": {"type": "integer", "minimum": 0, "maximum": LIMITS["retry_attempts"]},
            "per_try_timeout_ms": {"type": "integer", "minimum": 0, "maximum": LIMITS["timeout_ms"]},
        },
    )
    stage = closed_object(
        {
            "name": label,
            "variants": variants,
            "branches": branches,
            "branch_on": {"type": "string", "pattern": anchored(FIELD_NAME.pattern)},
            "members": {"type": "array", "items": {"$ref": "#/$defs/member"}, "maxItems": LIMITS["members"]},
            "join": closed_object({"model": label, "version": version}, ("model", "version")),
            "shadow": shadow,
            "timeout_ms": timeout,
            "retry": retry,
            "rollout": rollout,
            "protocol": {"enum": list(PROTOCOLS)},
        },
        ("name",),
        oneOf=[{"required": ["variants"]}, {"required": ["branches"]}, {"required": ["members"]}],
    )
    topic = {"type": "string", "pattern": anchored(TOPIC.pattern)}
    return {
        "$schema": SCHEMA,
        "$id": "urn:mllambda:schema:pipeline",
        "title": "ML Lambda pipeline definition (mllambda apply -f)",
        **closed_object(
            {
                "kind": {"const": "Pipeline"},
                "apiVersion": {"type": "string"},
                "name": label,
                "transport": {"enum": list(TRANSPORTS), "default": "http"},
                "stages": {
                    "type": "array",
                    "items": {"$ref": "#/$defs/stage"},
                    "minItems": 1,
                    "maxItems": LIMITS["stages"],
                },
                "input_topic": topic,
                "output_topic": topic,
                "logging": closed_object({"percent": {"type": "number", "minimum": 0, "maximum": 100}}),
                "input": {
                    "type": "object",
                    "additionalProperties": {"enum": list(CONTRACT_TYPES)},
                    "maxProperties": MAX_INPUT_FIELDS,
                },
                "priority": {
                    "description": "when its models are saturated: critical first, sheddable refused first",
                    "oneOf": [{"enum": list(PRIORITIES)}, {"type": "integer", "minimum": -1000, "maximum": 1000}],
                },
                "fairness": closed_object(
                    {
                        "header": {
                            "type": "string",
                            "pattern": "^[a-z0-9][a-z0-9-]{0,63}$",
                            "not": {"pattern": "^x-(mll|envoy)-"},
                        },
                        "shares": {
                            "description": "a caller key's weight in fair shares and quotas (others: 1)",
                            "type": "object",
                            "maxProperties": SHARES_MAX,
                            "propertyNames": {"pattern": "^[!-~]{1,64}$"},
                            "additionalProperties": {"type": "integer", "minimum": 1, "maximum": SHARE_WEIGHT_MAX},
                        },
                    }
                ),
                "rate_limit": closed_object(
                    {
                        "per_second": {"type": "integer", "minimum": 1, "maximum": RATE_LIMIT_MAX},
                        "burst": {"type": "integer", "minimum": 1, "maximum": RATE_LIMIT_MAX},
                        "keys": {"type": "integer", "minimum": 1, "maximum": RATE_KEYS_MAX},
                    },
                    ("per_second",),
                ),
                "max_body": {
                    "description": "bytes of a request body (and of each stage's answer), or with Ki or Mi: 16Mi",
                    "oneOf": [
                        {"type": "integer", "minimum": MIN_MAX_BODY, "maximum": MAX_BODY_CEILING},
                        {"type": "string", "pattern": "^[0-9]{1,12}(Ki|Mi)?$"},
                    ],
                },
            },
            ("name", "stages"),
        ),
        "$defs": {"variant": variant, "branch": branch, "member": member, "stage": stage},
    }
