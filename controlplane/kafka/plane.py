"""Kafka pipelines on the control plane side: routing tables, topics, entry routers, bridge calls.

- Tables go to Consul KV (runtimes watch them). A pipeline that leaves Kafka
  mode keeps its table, marked inactive: runtimes drain what is in flight.
- Entry router: one consumer per Kafka pipeline (active or draining) on its input topic (a user
  topic if configured) that picks stage 0's variant like every other hop.
- Bridge calls: an HTTP request becomes a message into stage 0 with a correlation id and
  this process's reply topic; the last stage (or the dead-letter path) answers there.
  bridge.py serves them over HTTP.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import consul.aio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from contract import headers as h
from contract.kafka_io import (
    CONSUMER_SIZES,
    PRODUCER_SIZES,
    Headers,
    NoRoutingTable,
    consume_batches,
    dead_letter,
    external,
    header,
    supervise,
    with_header,
)
from contract.naming import hop_group, router_group, routing_table_prefix
from contract.payload import NotAnObject, parse_object
from contract.routing import PipelineTables, RoutingTable
from contract.watch import Backoff
from controlplane.pipeline.model import Pipeline
from controlplane.translate.topics import routing_table

log = logging.getLogger("mllambda.kafka")
PARTITIONS = 3
TICK = 0.2  # seconds between consumer checks while a Kafka version waits
MAX_WAITING = 1_000  # bridge calls waiting for a result at once; more are refused (503) at once
MAX_WAIT = 300.0  # seconds a bridge call waits at most, whatever the pipeline's timeouts add up to
ROUTER_LINGER = 60.0  # seconds an inactive pipeline's entry router keeps draining its input topic
BROKER_TIMEOUT = 5.0  # seconds one round of broker calls may take
TOPIC_CHECK = 2.0  # seconds between checks that the broker still has our topics, and Consul our routing tables
Reply = tuple[int, bytes, str]  # HTTP status, body, served chain


class KafkaPlane:
    def __init__(self, bootstrap: str, client: consul.aio.Consul, kv_prefix: str, reply_topic: str) -> None:
        self.bootstrap = bootstrap
        self.client = client
        self.prefix = routing_table_prefix(kv_prefix)
        self.tables: dict[str, PipelineTables] = {}
        self.routers: dict[tuple[str, str], asyncio.Task[None]] = {}  # (pipeline, input topic) -> its router
        self.reply_topic = reply_topic  # contract.naming.bridge_reply_topic of this control plane's bridge
        self.waiting: dict[str, asyncio.Future[Reply]] = {}
        self.producer: AIOKafkaProducer | None = None
        self._reply_task: asyncio.Task[None] | None = None
        self._topics: set[str] = set()
        self._topics_checked = 0.0
        self._tables_checked = 0.0
        self.topics_remade = 0  # topics the broker lost and we made again (a restart without storage)
        self.rng = random.Random()
        self.admin: AIOKafkaAdminClient | None = None
        self._missing: dict[tuple[str, int], list[str]] = {}  # (pipeline, version) -> hops without a consumer
        self._wanted: list[tuple[Pipeline, int]] = []
        self._unsynced = False
        self._nudge = asyncio.Event()
        self.started = False
        self._idle_since: dict[tuple[str, str], float] = {}  # router -> since when no version enters there
        self._retired: set[tuple[str, str]] = set()  # routers stopped after their linger
        self.router_restarts: dict[str, int] = {}  # pipeline -> times its entry router was started again
        self.error = ""  # the last broker or Consul failure, until a round succeeds

    def want(self, pipelines: list[tuple[Pipeline, int]]) -> None:
        """The live pipelines changed: publish their tables (in `run`, never on the caller's time)."""
        self._wanted, self._unsynced = pipelines, True
        self._nudge.set()

    async def run(self, pending: Callable[[], list[tuple[str, int]]], checked: Callable[[], None]) -> None:
        """Connect, publish tables, check consumers of pending versions; retried with backoff, forever.

        Runs beside the HTTP reconcile loop, so a slow or absent broker delays
        only Kafka pipelines. `checked` is told after each consumer check.
        """
        backoff = Backoff(cap=5.0)
        while True:
            try:
                await asyncio.wait_for(self._nudge.wait(), timeout=TICK)
            except TimeoutError:
                pass
            self._nudge.clear()
            try:
                if not self.started:
                    await asyncio.wait_for(self.start(), BROKER_TIMEOUT)
                    self._unsynced = True  # entry routers start with the tables
                if self._wanted and time.monotonic() > self._tables_checked + TOPIC_CHECK:
                    self._unsynced = True  # read back, and written again if Consul lost them (restarted empty)
                if self._unsynced:
                    self._unsynced = False
                    self._tables_checked = time.monotonic()
                    try:
                        await asyncio.wait_for(self.sync(self._wanted), BROKER_TIMEOUT)
                    except BaseException:
                        self._unsynced = True
                        raise
                await asyncio.wait_for(self.keep_topics(), BROKER_TIMEOUT)
                self.retire_routers()
                versions = pending()
                if versions:
                    await asyncio.wait_for(self.check_consumers(versions), BROKER_TIMEOUT)
                    checked()
                if self.error:
                    log.info("kafka: working again")
                self.error = ""
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if not self.error:
                    log.warning("kafka: %s; retrying with backoff (HTTP pipelines are not affected)", err or type(err))
                self.error = f"{type(err).__name__}: {err}"[:200]
                await asyncio.sleep(backoff.next_delay())

    async def start(self) -> None:
        await self.stop()  # what a failed earlier attempt left
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=2, **PRODUCER_SIZES)
        await self.producer.start()
        self.admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await self.admin.start()
        await self._create_topics([self.reply_topic], partitions=1)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False, **CONSUMER_SIZES
        )
        await consumer.start()
        consumer.assign([TopicPartition(self.reply_topic, 0)])
        await consumer.seek_to_end()
        await consumer.position(TopicPartition(self.reply_topic, 0))  # settled before any request is sent
        self._reply_task = asyncio.create_task(self._collect_replies(consumer))
        self.started = True
        log.info("kafka: connected to %s", self.bootstrap)

    async def stop(self) -> None:
        for task in [*self.routers.values(), *([self._reply_task] if self._reply_task else [])]:
            task.cancel()
        await asyncio.gather(*self.routers.values(), return_exceptions=True)
        self.routers, self._reply_task, self.started = {}, None, False
        if self.producer is not None:
            await self.producer.stop()
        if self.admin is not None:
            await self.admin.close()
        self.producer = self.admin = None

    async def _create_topics(self, topics: list[str], partitions: int = PARTITIONS) -> None:
        missing = [t for t in topics if t not in self._topics]
        if not missing:
            return
        assert self.admin is not None
        existing = set(await self.admin.list_topics())
        new = [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in missing if t not in existing]
        if new:
            await self.admin.create_topics(new)
        self._topics.update(missing)

    async def keep_topics(self) -> None:
        """Topics we made that the broker no longer has are made again (a broker that restarted without its
        storage, as tansu's memory engine does; or one deleted by hand), so that what is produced from then on
        has somewhere to go. What the broker held when it lost them is gone with them: Kafka's durability is
        the broker's (docs/architecture.md, Kafka transport)."""
        if not self._topics or time.monotonic() < self._topics_checked + TOPIC_CHECK:
            return
        assert self.admin is not None
        self._topics_checked = time.monotonic()
        gone = self._topics - set(await self.admin.list_topics())
        if not gone:
            return
        log.warning(
            "kafka: the broker lost %d of our topics (restarted without its storage?): making them again", len(gone)
        )
        self._topics -= gone
        self.topics_remade += len(gone)
        await self._create_topics(sorted(gone - {self.reply_topic}))
        if self.reply_topic in gone:
            await self._create_topics([self.reply_topic], partitions=1)

    async def check_consumers(self, versions: list[tuple[str, int]]) -> None:
        """For each (pipeline, version): which of its hops have no consumer yet (kept for `missing_consumers`).

        A version takes traffic only once every hop's consumer group is stable with
        a member: otherwise its first requests would wait for the runtimes to join.
        """
        assert self.admin is not None
        found: dict[tuple[str, int], list[str]] = {}
        for name, version in versions:
            table = self.tables[name].newest if name in self.tables else None
            if table is None or table.version != version or not table.active:
                found[(name, version)] = ["its routing table (not published yet)"]
                continue
            topics = [v.topic for stage in table.stages for group in stage.groups for v in group.variants]
            groups = {hop_group(t): t for t in topics}
            try:
                # One group per request: tansu cannot answer a DescribeGroups naming several.
                answers = await asyncio.gather(*(self.admin.describe_consumer_groups([g]) for g in groups))
            except Exception as err:
                found[(name, version)] = [f"the broker ({err})"]
                continue
            ready = {
                g["group"]
                for described in answers
                for response in described
                for g in response.to_object()["groups"]
                if g["error_code"] == 0 and g["state"] == "Stable" and g["members"]
            }
            found[(name, version)] = [f"a consumer of {topic}" for group, topic in groups.items() if group not in ready]
        self._missing = found

    def missing_consumers(self, name: str, version: int) -> list[str]:
        return self._missing.get((name, version), ["a consumer check (not run yet)"])

    async def sync(self, pipelines: list[tuple[Pipeline, int]]) -> None:
        """Publish tables for Kafka pipelines (a new version beside the kept ones); mark the others inactive."""
        _, items = await self.client.kv.get(self.prefix, recurse=True)
        published: dict[str, PipelineTables] = {}
        for item in items or []:
            try:
                published[item["Key"][len(self.prefix) :]] = PipelineTables.from_json(item["Value"] or b"")
            except ValueError as err:  # overwritten below if the pipeline is in Kafka mode
                log.warning("ignoring routing tables key=%s: %s", item["Key"], err)
        wanted: dict[str, PipelineTables] = {}
        for p, version in pipelines:
            if p.transport == "kafka":
                table = routing_table(p, version)
                wanted[p.name] = (
                    published[p.name].with_newest(table) if p.name in published else PipelineTables((table,))
                )
        for name, tables in published.items():
            if name not in wanted:
                wanted[name] = tables.inactive()
        for name, tables in wanted.items():
            if tables.newest.active:
                await self._create_topics(tables.newest.all_topics())
            if published.get(name) != tables:
                await self.client.kv.put(f"{self.prefix}{name}", tables.to_json())
                newest = tables.newest
                log.info("routing table pipeline=%s version=%s active=%s", name, newest.version, newest.active)
        self.tables = wanted
        # One router per (pipeline, input topic). A router whose topic no active version enters
        # any more (the pipeline left Kafka mode, or its input topic changed) keeps running
        # ROUTER_LINGER seconds, so what is already on that topic still moves through; then it stops.
        now = time.monotonic()
        entering = {(name, t.newest.input) for name, t in wanted.items() if t.newest.active}
        known = entering | {(name, t.newest.input) for name, t in wanted.items()}
        for key in set(self.routers) | known:
            if key in entering:
                self._idle_since.pop(key, None)
                self._retired.discard(key)
            else:
                self._idle_since.setdefault(key, now)
        self.retire_routers()
        for key in known - set(self.routers) - self._retired:
            name, topic = key
            run = functools.partial(self._route_input, name, topic)
            died = functools.partial(self._router_died, name)
            self.routers[key] = asyncio.create_task(supervise(f"entry router of {name} on {topic}", run, died))

    async def _route_input(self, name: str, topic: str) -> None:
        """An input topic -> stage 0 of the newest version (weights, shadow), committed after the produce is acked."""
        assert self.producer is not None
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=self.bootstrap,
            group_id=router_group(name, topic),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **CONSUMER_SIZES,
        )
        await consumer.start()
        # A producer's own headers go along; ours (reply topic, version, ...) cannot be set from outside.
        await consume_batches(
            consumer,
            lambda record: self._enter(name, record.value, external(record.headers or [])),
            lambda record, reason: self._poisoned(name, record, reason),
        )

    def retire_routers(self) -> None:
        cutoff = time.monotonic() - ROUTER_LINGER
        for key in [k for k, since in self._idle_since.items() if since < cutoff]:
            del self._idle_since[key]
            self._retired.add(key)
            router = self.routers.pop(key, None)
            if router is not None:
                router.cancel()
                log.info("entry router of %s on %s stopped (no version enters there)", *key)

    def _router_died(self, name: str, reason: str) -> None:
        self.router_restarts[name] = self.router_restarts.get(name, 0) + 1

    def _newest(self, name: str) -> RoutingTable:
        tables = self.tables.get(name)
        if tables is None:  # the record waits uncommitted for them (contract.kafka_io.NoRoutingTable)
            raise NoRoutingTable(f"no routing table of pipeline {name!r} here now")
        return tables.newest

    async def _poisoned(self, name: str, record: Any, reason: str) -> None:
        assert self.producer is not None
        table = self._newest(name)
        await dead_letter(self.producer, table, record.value, external(record.headers or []), reason, "input")

    async def _enter(self, name: str, value: bytes, headers: Headers) -> None:
        """Into stage 0 of the newest version (weights, branch, shadow), acknowledged; marked with that version.

        Input that cannot enter is dead-lettered.
        """
        assert self.producer is not None
        table = self._newest(name)
        headers = with_header(headers, h.TABLE_VERSION, str(table.version))
        try:
            topics = table.next_topics(0, parse_object(value), self.rng)
        except (NotAnObject, LookupError) as err:
            await dead_letter(self.producer, table, value, headers, f"not valid input: {err}", "input")
            return
        await asyncio.gather(*(self.producer.send_and_wait(t, value, headers=headers) for t in topics))

    async def _collect_replies(self, consumer: AIOKafkaConsumer) -> None:
        try:
            async for record in consumer:
                headers = list(record.headers or [])
                future = self.waiting.pop(header(headers, h.CORRELATION), None)
                if future is not None and not future.done():
                    status = 422 if header(headers, h.ERROR) else 200
                    future.set_result((status, record.value, header(headers, h.SERVED)))
        finally:
            await consumer.stop()

    async def call(self, name: str, payload: bytes, timeout: float) -> Reply:
        """One request in, its result (or its dead-letter reason) out."""
        if self.producer is None or not self.started:
            return 503, json.dumps({"error": f"Kafka broker not reachable ({self.error or 'connecting'})"}).encode(), ""
        if name not in self.tables:  # an inactive table still drains: the gateway flips a moment after it
            return 404, json.dumps({"error": f"pipeline {name!r} is not in Kafka mode"}).encode(), ""
        if len(self.waiting) >= MAX_WAITING:
            return 503, json.dumps({"error": f"the bridge has {MAX_WAITING} calls waiting; try again"}).encode(), ""
        timeout = min(timeout, MAX_WAIT)
        correlation = uuid.uuid4().hex
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.waiting[correlation] = future
        headers = [(h.CORRELATION, correlation.encode()), (h.REPLY_TO, self.reply_topic.encode())]
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
