"""The Kafka transport: the same predict(), fed from topics instead of HTTP.

Routing tables (one per Kafka pipeline) come from the control plane through
Consul KV; runtimes never hard-code topics. A message moves one hop like this:
consume -> predict -> choose the next topic (weights, branch key, shadow copy)
-> produce and wait for the ack -> commit the consumed offset. So delivery is
at least once; nothing is committed before the next hop has it. Input that is
not a JSON object, a refused payload, or a predict that keeps failing goes to
the pipeline's dead-letter topic with the reason and the original bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import consul.aio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from runtime_sdk.app import Rejected, Runtime

log = logging.getLogger("mllambda.kafka")
CORRELATION = "mll-correlation-id"
REPLY_TO = "mll-reply-to"
SERVED = "x-mll-served"
ERROR = "mll-error"
Headers = list[tuple[str, bytes]]


def kafka_prefix(kv_prefix: str) -> str:
    """Where routing tables live, beside the pipeline versions."""
    return kv_prefix.rstrip("/") + "-kafka/"


def next_topics(table: dict[str, Any], index: int, output: dict[str, Any], rng: random.Random) -> list[str]:
    """Topics a message entering stage `index` goes to: the chosen variant, maybe a shadow copy.

    Past the last stage, the pipeline's output topic. Raises LookupError when
    the routing key matches no branch (the message is dead-lettered).
    """
    stages = table["stages"]
    if index >= len(stages):
        return [table["output"]]
    stage = stages[index]
    groups = stage["groups"]
    if len(groups) == 1 and groups[0]["key"] == "":
        group = groups[0]
    else:
        key = output.get(stage["branch_on"])
        group = next((g for g in groups if g["key"] == str(key)), None)
        if group is None:
            known = ", ".join(g["key"] for g in groups)
            raise LookupError(f"stage {stage['name']!r}: no branch for {stage['branch_on']}={key!r} (known: {known})")
    variants = [v for v in group["variants"] if v["weight"] > 0]
    topics = [rng.choices([v["topic"] for v in variants], weights=[v["weight"] for v in variants])[0]]
    shadow = stage.get("shadow")
    if shadow and rng.random() * 100 < shadow["percent"]:
        topics.append(shadow["topic"])
    return topics


def header(headers: Sequence[tuple[str, bytes]], name: str) -> str:
    return next((value.decode() for key, value in headers if key == name), "")


def with_header(headers: Sequence[tuple[str, bytes]], name: str, value: str) -> Headers:
    return [(k, v) for k, v in headers if k != name] + [(name, value.encode())]


async def dead_letter(
    producer: AIOKafkaProducer, table: dict[str, Any], raw: bytes, headers: Headers, reason: str, where: str
) -> None:
    """Park a message with why it failed; tell a waiting HTTP bridge too."""
    record = {"error": reason, "where": where, "payload": raw.decode(errors="replace")}
    await producer.send_and_wait(
        table["dead_letter"], json.dumps(record).encode(), headers=with_header(headers, ERROR, reason)
    )
    reply_to = header(headers, REPLY_TO)
    if reply_to:
        await producer.send_and_wait(
            reply_to, json.dumps({"error": reason}).encode(), headers=with_header(headers, ERROR, reason)
        )
    log.warning("dead-lettered pipeline=%s at=%s reason=%s", table["pipeline"], where, reason)


async def started(make: Callable[[], Any]) -> Any:
    """Start a fresh Kafka client, retrying while the broker (or the sidecar in front of it) is not there yet."""
    for attempt in range(1000):
        client = make()
        try:
            await client.start()
            return client
        except Exception as err:  # KafkaConnectionError and friends
            await client.stop()
            if attempt % 10 == 0:
                log.info("waiting for the Kafka broker: %s", err)
            await asyncio.sleep(min(2.0, 0.1 * (attempt + 1)))
    raise RuntimeError("Kafka broker unreachable")


async def consume_batches(consumer: AIOKafkaConsumer, handle: Callable[[Any], Awaitable[None]]) -> None:
    """Forever, then stop the consumer: at least once, for every hop and entry router.

    A fetched batch is handled concurrently (the producer batches the sends) and
    committed only once every message in it is acknowledged downstream.
    """
    try:
        while True:
            for partition, records in (await consumer.getmany(timeout_ms=500, max_records=500)).items():
                await asyncio.gather(*(handle(record) for record in records))
                await consumer.commit({partition: records[-1].offset + 1})
    finally:
        await consumer.stop()


class KafkaAdapter:
    """Follows the routing tables and runs one consumer per topic this model version serves."""

    def __init__(self, runtime: Runtime, bootstrap: str, client: consul.aio.Consul, kv_prefix: str) -> None:
        self.runtime = runtime
        self.bootstrap = bootstrap
        self.client = client
        self.prefix = kafka_prefix(kv_prefix)
        self.tables: dict[str, dict[str, Any]] = {}
        self.consumers: dict[str, asyncio.Task[None]] = {}
        self.producer: AIOKafkaProducer | None = None
        self.rng = random.Random()

    @property
    def cluster(self) -> str:
        return f"{self.runtime.model}.{self.runtime.version}"

    def subscriptions(self) -> dict[str, tuple[str, int, bool]]:
        """topic -> (pipeline, stage index, is shadow) for this model version."""
        found: dict[str, tuple[str, int, bool]] = {}
        for name, table in self.tables.items():
            for index, stage in enumerate(table["stages"]):
                for group in stage["groups"]:
                    for variant in group["variants"]:
                        if variant["cluster"] == self.cluster:
                            found[variant["topic"]] = (name, index, False)
                shadow = stage.get("shadow")
                if shadow and shadow["cluster"] == self.cluster:
                    found[shadow["topic"]] = (name, index, True)
        return found

    async def run(self) -> None:
        self.producer = await started(
            lambda: AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=2)
        )
        index = 0
        try:
            while True:
                try:
                    index, items = await self.client.kv.get(self.prefix, recurse=True, index=index or None, wait="30s")
                except asyncio.CancelledError:
                    raise
                except Exception as err:  # Consul away: keep serving the tables we have
                    log.warning("routing table watch failed: %s", err)
                    await asyncio.sleep(random.uniform(0.5, 2))
                    continue
                self.tables = {item["Key"][len(self.prefix) :]: json.loads(item["Value"]) for item in items or []}
                self._sync_consumers()
        finally:
            for task in self.consumers.values():
                task.cancel()
            await asyncio.gather(*self.consumers.values(), return_exceptions=True)
            await self.producer.stop()

    def _sync_consumers(self) -> None:
        wanted = self.subscriptions()
        for topic in set(wanted) - set(self.consumers):
            log.info("consuming topic=%s", topic)
            self.consumers[topic] = asyncio.create_task(self._consume(topic, *wanted[topic]))
        for topic in set(self.consumers) - set(wanted):
            self.consumers.pop(topic).cancel()

    async def _consume(self, topic: str, pipeline: str, index: int, shadow: bool) -> None:
        consumer = await started(
            lambda: AIOKafkaConsumer(
                topic,
                bootstrap_servers=self.bootstrap,
                group_id=f"mll.{topic}",  # replicas of one model version share the work
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
        )
        await consume_batches(consumer, lambda record: self._handle(pipeline, index, shadow, record))

    async def _handle(self, pipeline: str, index: int, shadow: bool, record: Any) -> None:
        assert self.producer is not None
        table = self.tables.get(pipeline)
        if table is None:
            return
        stage = table["stages"][index]
        headers: Headers = list(record.headers or [])
        where = f"{stage['name']}={self.runtime.model}:{self.runtime.version}"
        try:
            payload = json.loads(record.value)
            if not isinstance(payload, dict):
                raise ValueError(f"expected a JSON object, got {type(payload).__name__}")
        except ValueError as err:
            await dead_letter(self.producer, table, record.value, headers, f"not valid input: {err}", where)
            return
        try:
            output = await self._predict(payload, attempts=1 + int(stage.get("retries", 0)))
        except Rejected as err:
            await dead_letter(self.producer, table, record.value, headers, f"refused: {err}", where)
            return
        except Exception as err:
            await dead_letter(
                self.producer, table, record.value, headers, f"predict failed: {type(err).__name__}: {err}", where
            )
            return
        if shadow:
            return  # a copy: answered, never forwarded
        served = header(headers, SERVED)
        headers = with_header(headers, SERVED, f"{served}, {where}" if served else where)
        try:
            topics = next_topics(table, index + 1, output, self.rng)
        except LookupError as err:
            await dead_letter(self.producer, table, record.value, headers, str(err), where)
            return
        body = json.dumps(output).encode()
        await asyncio.gather(*(self.producer.send_and_wait(t, body, headers=headers) for t in topics))
        reply_to = header(headers, REPLY_TO)
        if index + 1 == len(table["stages"]) and reply_to:
            await self.producer.send_and_wait(reply_to, body, headers=headers)

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
