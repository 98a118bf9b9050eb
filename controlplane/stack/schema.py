"""A JSON Schema of the stack file (`kind: Stack`), for editors; its pipelines use the pipeline schema.

Built from the same constants as the parser (stack/file.py): the port names, the runtime
fields, the autoscaling policy's bounds. docs/schemas/stack.schema.json is this, written out.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from contract.naming import LABEL, RULES, VERSION
from controlplane.pipeline.schema import SCHEMA, anchored, closed_object, pipeline_schema
from controlplane.scaling.policy import MAX_REPLICAS, MAX_WINDOW
from controlplane.stack.file import Ports


def stack_schema() -> dict[str, Any]:
    label = {"type": "string", "pattern": anchored(LABEL.pattern), "description": RULES[LABEL]}
    version = {"type": "string", "pattern": anchored(VERSION.pattern), "description": RULES[VERSION]}
    port = {"type": "integer", "minimum": 1, "maximum": 65535}
    autoscale = closed_object(
        {
            "min_replicas": {"type": "integer", "minimum": 0, "maximum": MAX_REPLICAS},
            "max_replicas": {"type": "integer", "minimum": 1, "maximum": MAX_REPLICAS},
            "target_in_flight": {"type": "number", "minimum": 0.1, "maximum": 10_000},
            "target_p99_ms": {"type": "number", "minimum": 1, "maximum": 600_000},
            "up_window": {"type": "number", "minimum": 0, "maximum": MAX_WINDOW},
            "down_window": {"type": "number", "minimum": 0, "maximum": MAX_WINDOW},
        }
    )
    runtime = closed_object(
        {
            "model": label,
            "version": version,
            "target": {"type": "string", "description": "MODULE:CALLABLE in ML Lambda's environment"},
            "loader": {"type": "string", "description": "MODULE:CALLABLE run once before the runtime turns ready"},
            "package": {"type": "string", "description": "a model package's folder, relative to the stack file"},
            "manifest": {"type": "string", "description": "the package's manifest, a file in that folder"},
            "replicas": {"type": "integer", "minimum": 0, "maximum": 100},
            "args": {"type": "array", "items": {"type": "string"}, "description": "more `mllambda runtime` flags"},
            "autoscale": autoscale,
        },
        ("model", "version"),
        oneOf=[{"required": ["target"]}, {"required": ["package"]}],
    )
    pipeline = pipeline_schema()
    return {
        "$schema": SCHEMA,
        "$id": "urn:mllambda:schema:stack",
        "title": "ML Lambda stack file (mllambda up -f)",
        **closed_object(
            {
                "kind": {"const": "Stack"},
                "name": label,
                "ports": closed_object({f.name: port for f in fields(Ports)}),
                "runtimes": {"type": "array", "items": runtime},
                "pipelines": {"type": "array", "items": {"$ref": "#/$defs/pipeline"}},
                "kafka": {"type": "boolean"},
                "gateway_concurrency": {"type": "integer", "minimum": 1, "maximum": 256},
                "security": {"enum": ["mtls", "plaintext"]},
            },
            ("kind",),
        ),
        "$defs": {
            **{k: v for k, v in pipeline["$defs"].items()},
            "pipeline": {k: v for k, v in pipeline.items() if k not in ("$schema", "$id", "$defs", "title")},
        },
    }
