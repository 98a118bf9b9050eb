"""Kafka pipelines -> routing tables the runtimes follow. Pure: no I/O.

Each hop is a topic: `mll.<pipeline>.<stage>.<model>.<version>` (shadows add
`.shadow`). The producer of a hop picks the next variant by weight, and the
branch by the routing key, with the same rules as the HTTP routes.
"""

from __future__ import annotations

from typing import Any

from controlplane.model import Pipeline, Stage, Variant


def input_topic(p: Pipeline) -> str:
    return p.input_topic or f"mll.{p.name}.in"


def output_topic(p: Pipeline) -> str:
    return p.output_topic or f"mll.{p.name}.out"


def dead_letter_topic(p: Pipeline) -> str:
    return f"mll.{p.name}.dlq"


def hop_topic(p: Pipeline, stage: Stage, cluster: str, shadow: bool = False) -> str:
    return f"mll.{p.name}.{stage.name}.{cluster}" + (".shadow" if shadow else "")


def _variants(p: Pipeline, stage: Stage, variants: tuple[Variant, ...]) -> list[dict[str, Any]]:
    return [{"cluster": v.cluster, "weight": v.weight, "topic": hop_topic(p, stage, v.cluster)} for v in variants]


def routing_table(p: Pipeline, version: int, active: bool = True) -> dict[str, Any]:
    """What every runtime (and the entry router) needs to move a message one hop."""
    stages = []
    for stage in p.stages:
        groups = [{"key": "", "variants": _variants(p, stage, stage.variants)}] if stage.variants else []
        groups += [{"key": b.key, "variants": _variants(p, stage, b.variants)} for b in stage.branches]
        shadow = None
        if stage.shadow:
            topic = hop_topic(p, stage, stage.shadow.cluster, shadow=True)
            shadow = {"cluster": stage.shadow.cluster, "percent": stage.shadow.percent, "topic": topic}
        stages.append(
            {"name": stage.name, "branch_on": stage.branch_on, "groups": groups, "shadow": shadow,
             "timeout_ms": stage.timeout_ms, "retries": stage.retry.attempts}
        )  # fmt: skip
    return {
        "pipeline": p.name,
        "version": version,
        "active": active,  # inactive tables still drain what is in flight
        "input": input_topic(p),
        "output": output_topic(p),
        "dead_letter": dead_letter_topic(p),
        "stages": stages,
    }


def all_topics(table: dict[str, Any]) -> list[str]:
    topics = [table["input"], table["output"], table["dead_letter"]]
    for stage in table["stages"]:
        topics += [v["topic"] for g in stage["groups"] for v in g["variants"]]
        if stage["shadow"]:
            topics.append(stage["shadow"]["topic"])
    return topics
