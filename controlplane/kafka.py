"""Kafka pipelines on the control plane side: routing tables, topics, entry routers, HTTP bridge.

- Tables go to Consul KV (runtimes watch them). A pipeline that leaves Kafka
  mode keeps its table, marked inactive: runtimes drain what is in flight.
- Entry router: one consumer per Kafka pipeline (active or draining) on its input topic (a user
  topic if configured) that picks stage 0's variant like every other hop.
- Bridge: an HTTP request becomes a message into stage 0 with a correlation id and
  this process's reply topic; the last stage (or the dead-letter path) answers there.
  Every control plane serves it and registers it in Consul (`BRIDGE_SERVICE`), so
  gateways spread bridge requests over all of them and retry another when one dies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import uuid
from typing import Any

import consul
import consul.aio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from controlplane.discovery import BRIDGE_SERVICE
from controlplane.model import Pipeline
from controlplane.translate.kafka import all_topics, routing_table
from runtime_sdk.kafka import (
    CORRELATION,
    ERROR,
    REPLY_TO,
    SERVED,
    consume_batches,
    dead_letter,
    header,
    kafka_prefix,
    next_topics,
)

log = logging.getLogger("mllambda.kafka")
PARTITIONS = 3


class KafkaPlane:
    def __init__(self, bootstrap: str, client: consul.aio.Consul, kv_prefix: str) -> None:
        self.bootstrap = bootstrap
        self.client = client
        self.prefix = kafka_prefix(kv_prefix)
        self.tables: dict[str, dict[str, Any]] = {}
        self.routers: dict[str, asyncio.Task[None]] = {}
        self.reply_topic = f"mll.bridge.{uuid.uuid4().hex[:12]}"
        self.waiting: dict[str, asyncio.Future[tuple[int, bytes, str]]] = {}
        self.producer: AIOKafkaProducer | None = None
        self._reply_task: asyncio.Task[None] | None = None
        self._topics: set[str] = set()
        self.rng = random.Random()

    async def start(self) -> None:
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=2)
        await self.producer.start()
        await self._create_topics([self.reply_topic], partitions=1)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False)
        await consumer.start()
        consumer.assign([TopicPartition(self.reply_topic, 0)])
        await consumer.seek_to_end()
        await consumer.position(TopicPartition(self.reply_topic, 0))  # settled before any request is sent
        self._reply_task = asyncio.create_task(self._collect_replies(consumer))

    async def stop(self) -> None:
        for task in [*self.routers.values(), *([self._reply_task] if self._reply_task else [])]:
            task.cancel()
        await asyncio.gather(*self.routers.values(), return_exceptions=True)
        if self.producer is not None:
            await self.producer.stop()

    async def _create_topics(self, topics: list[str], partitions: int = PARTITIONS) -> None:
        missing = [t for t in topics if t not in self._topics]
        if not missing:
            return
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            new = [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in missing if t not in existing]
            if new:
                await admin.create_topics(new)
        finally:
            await admin.close()
        self._topics.update(missing)

    async def sync(self, pipelines: list[tuple[Pipeline, int]]) -> None:
        """Publish tables for Kafka pipelines; mark the others inactive; run the routers."""
        _, items = await self.client.kv.get(self.prefix, recurse=True)
        published = {item["Key"][len(self.prefix) :]: json.loads(item["Value"]) for item in items or []}
        wanted: dict[str, dict[str, Any]] = {}
        for pipeline, version in pipelines:
            if pipeline.transport == "kafka":
                wanted[pipeline.name] = routing_table(pipeline, version)
        for name, table in published.items():
            if name not in wanted:
                wanted[name] = {**table, "active": False}
        for name, table in wanted.items():
            if table["active"]:
                await self._create_topics(all_topics(table))
            if published.get(name) != table:
                await self.client.kv.put(f"{self.prefix}{name}", json.dumps(table))
                log.info("routing table pipeline=%s version=%s active=%s", name, table["version"], table["active"])
        self.tables = wanted
        # Routers keep running for inactive tables too: what is already on an
        # input topic still moves through (nothing new arrives there).
        for name in set(wanted) - set(self.routers):
            self.routers[name] = asyncio.create_task(self._route_input(name))

    async def _route_input(self, name: str) -> None:
        """Input topic -> stage 0 (weights, shadow), committing only after the produce is acked."""
        assert self.producer is not None
        topic = self.tables[name]["input"]
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=self.bootstrap, group_id=f"mll.{name}.router",
            enable_auto_commit=False, auto_offset_reset="earliest",
        )  # fmt: skip
        await consumer.start()
        await consume_batches(consumer, lambda record: self._enter(name, record.value, list(record.headers or [])))

    async def _enter(self, name: str, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        """Into stage 0 (weights, branch, shadow), acknowledged; input that cannot enter is dead-lettered."""
        assert self.producer is not None
        table = self.tables[name]
        try:
            payload = json.loads(value)
            if not isinstance(payload, dict):
                raise ValueError(f"expected a JSON object, got {type(payload).__name__}")
            topics = next_topics(table, 0, payload, self.rng)
        except (ValueError, LookupError) as err:
            await dead_letter(self.producer, table, value, headers, f"not valid input: {err}", "input")
            return
        await asyncio.gather(*(self.producer.send_and_wait(t, value, headers=headers) for t in topics))

    async def _collect_replies(self, consumer: AIOKafkaConsumer) -> None:
        try:
            async for record in consumer:
                headers = list(record.headers or [])
                future = self.waiting.pop(header(headers, CORRELATION), None)
                if future is not None and not future.done():
                    status = 422 if header(headers, ERROR) else 200
                    future.set_result((status, record.value, header(headers, SERVED)))
        finally:
            await consumer.stop()

    async def call(self, name: str, payload: bytes, timeout: float) -> tuple[int, bytes, str]:
        """The HTTP bridge: one request in, its result (or its dead-letter reason) out."""
        assert self.producer is not None
        table = self.tables.get(name)
        if table is None:  # an inactive table still drains: the gateway flips a moment after it
            return 404, json.dumps({"error": f"pipeline {name!r} is not in Kafka mode"}).encode(), ""
        correlation = uuid.uuid4().hex
        future: asyncio.Future[tuple[int, bytes, str]] = asyncio.get_running_loop().create_future()
        self.waiting[correlation] = future
        headers = [(CORRELATION, correlation.encode()), (REPLY_TO, self.reply_topic.encode())]
        try:
            # Straight into stage 0, not through the input topic: the entry routers'
            # consumer group is not on this path, so losing a control plane stalls no request.
            await self._enter(name, payload, headers)
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            message = {"error": f"no result from pipeline {name!r} within {timeout:.0f}s (it is still in the topics)"}
            return 504, json.dumps(message).encode(), ""
        finally:
            self.waiting.pop(correlation, None)


async def register_bridge(client: consul.aio.Consul, service_id: str, host: str, port: int, kv_prefix: str) -> None:
    """This control plane's bridge, for every control plane of the deployment (same KV prefix) to route to."""
    check = consul.Check.http(f"http://{host}:{port}/healthz", interval="1s", timeout="1s", deregister="1m")
    await client.agent.service.register(
        BRIDGE_SERVICE,
        service_id=service_id,
        address=host,
        port=port,
        tags=[BRIDGE_SERVICE],
        meta={"kv_prefix": kv_prefix},
        check=check,
    )
