"""How a record moves one Kafka hop, for runtimes and the control plane's entry routers alike.

Delivery is at least once: a fetched batch is handled, every produce is
acknowledged, and only then is the batch's offset committed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from contract import headers as h
from contract.routing import RoutingTable

log = logging.getLogger("mllambda.kafka")
Headers = list[tuple[str, bytes]]


def header(headers: Sequence[tuple[str, bytes]], name: str) -> str:
    return next((value.decode() for key, value in headers if key == name), "")


def with_header(headers: Sequence[tuple[str, bytes]], name: str, value: str) -> Headers:
    return [(k, v) for k, v in headers if k != name] + [(name, value.encode())]


async def dead_letter(
    producer: AIOKafkaProducer, table: RoutingTable, raw: bytes, headers: Headers, reason: str, where: str
) -> None:
    """Park a message with why it failed; tell a waiting HTTP bridge too."""
    record = {"error": reason, "where": where, "payload": raw.decode(errors="replace")}
    marked = with_header(headers, h.ERROR, reason)
    await producer.send_and_wait(table.dead_letter, json.dumps(record).encode(), headers=marked)
    reply_to = header(headers, h.REPLY_TO)
    if reply_to:
        await producer.send_and_wait(reply_to, json.dumps({"error": reason}).encode(), headers=marked)
    log.warning("dead-lettered pipeline=%s at=%s reason=%s", table.pipeline, where, reason)


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
