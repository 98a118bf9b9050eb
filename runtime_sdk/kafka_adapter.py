"""The Kafka transport: the same predict(), fed from topics instead of HTTP.

Routing tables (the last few versions per Kafka pipeline) come from the control
plane through Consul KV; runtimes never hard-code topics. A message moves one
hop like this: consume -> find the table of the version it entered with ->
predict -> choose the next topic (weights, branch key, shadow copy) -> produce
and wait for the ack -> commit the consumed offset. So delivery is
at least once; nothing is committed before the next hop has it. Input that is
not a JSON object, a refused payload, or a predict that keeps failing goes to
the pipeline's dead-letter topic with the reason and the original bytes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from typing import Any

import consul.aio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from contract import headers as h
from contract.kafka_io import (
    CONSUMER_SIZES,
    PRODUCER_SIZES,
    Headers,
    NoRoutingTable,
    consume_batches,
    dead_letter,
    header,
    reply,
    started,
    supervise,
    with_header,
)
from contract.naming import hop_group, routing_table_prefix
from contract.payload import NotAnObject, encode, parse_object
from contract.routing import PipelineTables
from contract.watch import WAIT, watch
from runtime_sdk.app import Runtime
from runtime_sdk.errors import Rejected

log = logging.getLogger("mllambda.kafka")


class KafkaAdapter:
    """Follows the routing tables and runs one consumer per topic this model version serves."""

    def __init__(self, runtime: Runtime, bootstrap: str, client: consul.aio.Consul, kv_prefix: str) -> None:
        self.runtime = runtime
        self.bootstrap = bootstrap
        self.client = client
        self.prefix = routing_table_prefix(kv_prefix)
        self.tables: dict[str, PipelineTables] = {}
        self.consumers: dict[str, asyncio.Task[None]] = {}
        self.producer: AIOKafkaProducer | None = None
        self.rng = random.Random()
        self.failing = runtime.kafka_failing  # topic -> why its consumer last stopped (until it runs again)

    def subscriptions(self) -> dict[str, str]:
        """topic -> pipeline, for every hop this model version serves in a kept table version."""
        return {topic: name for name, tables in self.tables.items() for topic in tables.topics(self.runtime.cluster)}

    async def run(self) -> None:
        self.producer = await started(
            lambda: AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=2, **PRODUCER_SIZES)
        )
        try:
            await watch(self._query_tables, self._take_tables, what="routing tables")
        finally:
            for task in self.consumers.values():
                task.cancel()
            await asyncio.gather(*self.consumers.values(), return_exceptions=True)
            await self.producer.stop()

    async def _query_tables(self, index: int | None) -> tuple[Any, list[dict[str, Any]]]:
        found, items = await self.client.kv.get(self.prefix, recurse=True, index=index, wait=WAIT)
        return found, items or []

    def _take_tables(self, items: list[dict[str, Any]]) -> None:
        tables = {}
        for item in items:
            name = item["Key"][len(self.prefix) :]
            try:
                tables[name] = PipelineTables.from_json(item["Value"] or b"")
            except ValueError as err:  # keep what we had for it: a broken record stops no other pipeline
                log.warning("ignoring routing table key=%s: %s", item["Key"], err)
                if name in self.tables:
                    tables[name] = self.tables[name]
        self.tables = tables
        self._sync_consumers()

    def _sync_consumers(self) -> None:
        wanted = self.subscriptions()
        for topic in set(wanted) - set(self.consumers):
            log.info("consuming topic=%s", topic)
            run = functools.partial(self._consume, topic, wanted[topic])
            died = functools.partial(self._died, topic)
            self.consumers[topic] = asyncio.create_task(supervise(f"consumer of {topic}", run, died))
        for topic in set(self.consumers) - set(wanted):
            self.consumers.pop(topic).cancel()

    async def _consume(self, topic: str, pipeline: str) -> None:
        consumer = await started(
            lambda: AIOKafkaConsumer(
                topic,
                bootstrap_servers=self.bootstrap,
                group_id=hop_group(topic),
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                **CONSUMER_SIZES,
            )
        )
        self.failing.pop(topic, None)
        await consume_batches(
            consumer,
            lambda record: self._handle(pipeline, topic, record),
            lambda record, reason: self._poisoned(pipeline, topic, record, reason),
        )

    def _died(self, topic: str, reason: str) -> None:
        self.failing[topic] = reason
        self.runtime.metrics.kafka_restarts.labels(topic).inc()

    async def _poisoned(self, pipeline: str, topic: str, record: Any, reason: str) -> None:
        """A record whose handling failed in a way that would fail again: parked with the reason."""
        assert self.producer is not None
        tables = self.tables.get(pipeline)
        if tables is None:  # nowhere to park it now: read again later
            raise NoRoutingTable(f"no routing table of pipeline {pipeline!r} here now")
        headers = [(k, v or b"") for k, v in record.headers or []]
        await dead_letter(self.producer, tables.newest, record.value, headers, f"poison: {reason}", topic)

    async def _handle(self, pipeline: str, topic: str, record: Any) -> None:
        assert self.producer is not None
        tables = self.tables.get(pipeline)
        if tables is None:  # gone for now (its consumer is being cancelled): read again later, never skipped
            raise NoRoutingTable(f"no routing table of pipeline {pipeline!r} here now")
        headers: Headers = [(k, v or b"") for k, v in record.headers or []]
        entered = header(headers, h.TABLE_VERSION)
        table = tables.get(int(entered) if entered.isdigit() else None)
        hop = table.subscriptions(self.runtime.cluster).get(topic) if table else None
        if table is None or hop is None:
            reason = f"version {entered} of pipeline {pipeline!r} has no hop on {topic} (its routing table is gone)"
            await dead_letter(self.producer, tables.newest, record.value, headers, reason, topic)
            return
        index, shadow = hop
        stage = table.stages[index]
        where = f"{stage.name}={self.runtime.model}:{self.runtime.version}"
        try:
            payload = parse_object(record.value)
        except NotAnObject as err:
            await dead_letter(self.producer, table, record.value, headers, f"not valid input: {err}", where)
            return
        try:
            output = await self._predict(payload, attempts=1 + stage.retries)
        except Rejected as err:
            await dead_letter(self.producer, table, record.value, headers, f"refused: {err}", where)
            return
        except Exception as err:
            kind = type(err).__name__
            told = f"model {self.runtime.model}:{self.runtime.version} failed ({kind}); see {table.dead_letter}"
            reason = f"predict failed: {kind}: {err}"
            await dead_letter(self.producer, table, record.value, headers, reason, where, told)
            return
        if shadow:
            return  # a copy: answered, never forwarded
        served = header(headers, h.SERVED)
        headers = with_header(headers, h.SERVED, f"{served}, {where}" if served else where)
        try:
            topics = table.next_topics(index + 1, output, self.rng)
        except LookupError as err:
            await dead_letter(self.producer, table, record.value, headers, str(err), where)
            return
        body = encode(output)
        await asyncio.gather(*(self.producer.send_and_wait(t, body, headers=headers) for t in topics))
        if index + 1 == len(table.stages):
            await reply(self.producer, headers, body, headers)

    async def _predict(self, payload: dict[str, Any], attempts: int) -> dict[str, Any]:
        for attempt in range(attempts):
            try:
                return await self.runtime.call_model(payload)
            except Rejected:
                raise
            except Exception:
                if attempt + 1 == attempts:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")
