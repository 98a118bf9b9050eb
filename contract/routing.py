"""The Kafka routing tables: how a message moves from one hop's topic to the next.

The control plane builds one table per Kafka version of a pipeline and
publishes the last few (`PipelineTables`) as JSON in Consul KV; every runtime
and entry router follows them. A message carries the version it entered with
(header `mll-version`) and every hop routes it by that version's table, so a
change of stages never strands a message already on its way. The producer of
a hop picks the next variant by weight and the branch by the routing key, with
the same rules as the HTTP routes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

KEPT_VERSIONS = 4  # table versions kept per pipeline for messages still on their way


@dataclass(frozen=True)
class TopicVariant:
    cluster: str
    weight: int
    topic: str


@dataclass(frozen=True)
class TopicGroup:
    key: str  # "" for a plain split, else the branch key
    variants: tuple[TopicVariant, ...]


@dataclass(frozen=True)
class TopicShadow:
    cluster: str
    percent: float
    topic: str


@dataclass(frozen=True)
class StageTopics:
    name: str
    branch_on: str
    groups: tuple[TopicGroup, ...]
    shadow: TopicShadow | None
    timeout_ms: int
    retries: int

    def pick(self, output: Mapping[str, Any]) -> TopicGroup:
        """The split group a message goes to; LookupError when its routing key matches no branch."""
        if len(self.groups) == 1 and self.groups[0].key == "":
            return self.groups[0]
        key = output.get(self.branch_on)
        group = next((g for g in self.groups if g.key == str(key)), None)
        if group is None:
            known = ", ".join(g.key for g in self.groups)
            raise LookupError(f"stage {self.name!r}: no branch for {self.branch_on}={key!r} (known: {known})")
        return group


@dataclass(frozen=True)
class RoutingTable:
    pipeline: str
    version: int
    active: bool  # an inactive table (the pipeline left Kafka mode) still drains what is in flight
    input: str
    output: str
    dead_letter: str
    stages: tuple[StageTopics, ...]

    def next_topics(self, index: int, output: Mapping[str, Any], rng: random.Random) -> list[str]:
        """Topics a message entering stage `index` goes to: the chosen variant, maybe a shadow copy.

        Past the last stage, the pipeline's output topic. Raises LookupError when
        the routing key matches no branch (the message is dead-lettered).
        """
        if index >= len(self.stages):
            return [self.output]
        stage = self.stages[index]
        variants = [v for v in stage.pick(output).variants if v.weight > 0]
        topics = [rng.choices([v.topic for v in variants], weights=[v.weight for v in variants])[0]]
        if stage.shadow and rng.random() * 100 < stage.shadow.percent:
            topics.append(stage.shadow.topic)
        return topics

    def subscriptions(self, cluster: str) -> dict[str, tuple[int, bool]]:
        """topic -> (stage index, is shadow) for the hops one model version serves."""
        found: dict[str, tuple[int, bool]] = {}
        for index, stage in enumerate(self.stages):
            for group in stage.groups:
                found.update({v.topic: (index, False) for v in group.variants if v.cluster == cluster})
            if stage.shadow and stage.shadow.cluster == cluster:
                found[stage.shadow.topic] = (index, True)
        return found

    def all_topics(self) -> list[str]:
        topics = [self.input, self.output, self.dead_letter]
        for stage in self.stages:
            topics += [v.topic for g in stage.groups for v in g.variants]
            if stage.shadow:
                topics.append(stage.shadow.topic)
        return topics

    def inactive(self) -> RoutingTable:
        return replace(self, active=False)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> RoutingTable:
        """Parse a published table; ValueError says what is wrong with it."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: Any) -> RoutingTable:
        try:
            return cls(
                pipeline=str(data["pipeline"]),
                version=int(data["version"]),
                active=bool(data["active"]),
                input=str(data["input"]),
                output=str(data["output"]),
                dead_letter=str(data["dead_letter"]),
                stages=tuple(_stage(s) for s in data["stages"]),
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"not a routing table: {type(err).__name__}: {err}") from err


def _stage(data: Mapping[str, Any]) -> StageTopics:
    shadow = data.get("shadow")
    return StageTopics(
        name=str(data["name"]),
        branch_on=str(data["branch_on"]),
        groups=tuple(
            TopicGroup(
                str(g["key"]),
                tuple(TopicVariant(str(v["cluster"]), int(v["weight"]), str(v["topic"])) for v in g["variants"]),
            )
            for g in data["groups"]
        ),
        shadow=TopicShadow(str(shadow["cluster"]), float(shadow["percent"]), str(shadow["topic"])) if shadow else None,
        timeout_ms=int(data["timeout_ms"]),
        retries=int(data["retries"]),
    )


@dataclass(frozen=True)
class PipelineTables:
    """The kept table versions of one pipeline, oldest first; new messages enter the newest."""

    tables: tuple[RoutingTable, ...]

    @property
    def newest(self) -> RoutingTable:
        return self.tables[-1]

    def get(self, version: int | None) -> RoutingTable | None:
        """The table of `version` (None: the newest), if it is still kept."""
        if version is None:
            return self.newest
        return next((t for t in self.tables if t.version == version), None)

    def with_newest(self, table: RoutingTable) -> PipelineTables:
        kept = tuple(t for t in self.tables if t.version != table.version)
        return PipelineTables((*kept, table)[-KEPT_VERSIONS:])

    def inactive(self) -> PipelineTables:
        return PipelineTables((*self.tables[:-1], self.newest.inactive()))

    def topics(self, cluster: str) -> set[str]:
        """Every hop topic one model version serves in any kept version."""
        return {topic for t in self.tables for topic in t.subscriptions(cluster)}

    def to_json(self) -> str:
        return json.dumps([asdict(t) for t in self.tables], sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> PipelineTables:
        """Parse what is published for one pipeline; ValueError says what is wrong with it."""
        data = json.loads(text)
        items = data if isinstance(data, list) else [data]  # one bare table: the layout before versions
        if not items:
            raise ValueError("no routing table in it")
        return cls(tuple(RoutingTable.from_dict(item) for item in items))
