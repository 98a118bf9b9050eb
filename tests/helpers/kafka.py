"""Kafka from a test's side: send a record to a topic, read what a topic holds, a runtime on the Kafka transport."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient


async def send(bootstrap: str, topic: str, records: list[tuple[bytes | None, list[tuple[str, bytes]]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=2_000_000)
    await producer.start()
    try:
        for value, headers in records:
            key = b"tombstone" if value is None else None  # Kafka: a record needs a key or a value
            await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


async def consume(bootstrap: str, topic: str, count: int, timeout: float = 60, missing_ok: bool = False) -> list[Any]:
    """`count` records from the start of `topic`; with `missing_ok`, whatever arrived within `timeout`."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"test-{uuid.uuid4().hex[:6]}", auto_offset_reset="earliest"
    )
    await consumer.start()
    found: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            while len(found) < count:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    found += records
    except TimeoutError:
        if not missing_ok:
            raise
    finally:
        await consumer.stop()
    return found


async def group_members(bootstrap: str, group: str) -> int:
    """How many members a consumer group has once it is stable (0 while it rebalances or does not exist)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    groups = [g for response in described for g in response.to_object()["groups"]]
    return sum(len(g["members"]) for g in groups if g["error_code"] == 0 and g["state"] == "Stable")


def served(record: Any) -> str:
    return next((v.decode() for k, v in record.headers if k == "x-mll-served"), "")
