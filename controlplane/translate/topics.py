"""Kafka pipelines -> the routing tables runtimes follow (contract.routing). Pure: no I/O.

Each hop is a topic (contract.naming.hop_topic). The producer of a hop picks
the next variant by weight and the branch by the routing key, with the same
rules as the HTTP routes.
"""

from __future__ import annotations

from contract import naming
from contract.routing import RoutingTable, StageTopics, TopicGroup, TopicShadow, TopicVariant
from controlplane.pipeline.model import Pipeline, Stage, Variant


def _variants(p: Pipeline, stage: Stage, variants: tuple[Variant, ...]) -> tuple[TopicVariant, ...]:
    return tuple(TopicVariant(v.cluster, v.weight, naming.hop_topic(p.name, stage.name, v.cluster)) for v in variants)


def _stage(p: Pipeline, stage: Stage) -> StageTopics:
    shadow = None
    if stage.shadow:
        topic = naming.hop_topic(p.name, stage.name, stage.shadow.cluster, shadow=True)
        shadow = TopicShadow(stage.shadow.cluster, stage.shadow.percent, topic)
    return StageTopics(
        name=stage.name,
        branch_on=stage.branch_on,
        groups=tuple(TopicGroup(key, _variants(p, stage, variants)) for key, variants in stage.groups()),
        shadow=shadow,
        timeout_ms=stage.timeout_ms,
        retries=stage.retry.attempts,
    )


def routing_table(p: Pipeline, version: int) -> RoutingTable:
    """What every runtime (and the entry router) needs to move a message one hop."""
    return RoutingTable(
        pipeline=p.name,
        version=version,
        active=True,
        input=naming.input_topic(p.name, p.input_topic),
        output=naming.output_topic(p.name, p.output_topic),
        dead_letter=naming.dead_letter_topic(p.name),
        stages=tuple(_stage(p, stage) for stage in p.stages),
    )
