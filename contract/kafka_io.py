"""How a record moves one Kafka hop, for runtimes and the control plane's entry routers alike.

Delivery is at least once: a fetched batch is handled, every produce is
acknowledged, and only then is the batch's offset committed.

Poison: a record whose handling fails in a way that would fail again the same
way (not JSON, nested too deeply, a tombstone, a header that is not UTF-8, an
output too large for the broker, any bug the record triggers) goes to the
dead-letter topic with the reason, and the consumer goes on. A failure of the
broker or the group (connection lost, a rebalance that fails the commit) is not
the record's fault: the consumer stops without committing, and `supervise`
starts it again with backoff, so the batch is read again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import (
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
)

from contract import headers as h
from contract.naming import BRIDGE_REPLY_PREFIX
from contract.payload import KAFKA_MESSAGE_MAX, flat
from contract.routing import RoutingTable
from contract.watch import Backoff

log = logging.getLogger("mllambda.kafka")
# Sized for the largest body a pipeline may allow (contract/payload.py): a producer sends, and a consumer
# fetches, one record of up to KAFKA_MESSAGE_MAX (aiokafka's defaults, 1 MiB, would refuse or stall on it).
PRODUCER_SIZES: dict[str, Any] = {"max_request_size": KAFKA_MESSAGE_MAX}
CONSUMER_SIZES: dict[str, Any] = {"max_partition_fetch_bytes": KAFKA_MESSAGE_MAX, "fetch_max_bytes": KAFKA_MESSAGE_MAX}
Headers = list[tuple[str, bytes]]
PAYLOAD_KEPT = 256 * 1024  # bytes of the original payload copied into a dead-letter record
# Broker answers that concern the record itself: handling it again fails again.
RECORD_ERRORS = (MessageSizeTooLargeError, RecordTooLargeError, InvalidTopicError, TopicAuthorizationFailedError)


class NoRoutingTable(KafkaError):
    """A record of a pipeline whose routing tables are not known here right now (a Consul agent that came
    back empty before its keys were restored; tables being replaced): not the record's fault, so it stays
    uncommitted and is read again once they are back, never skipped (found by bench.soak)."""


def is_poison(err: BaseException) -> bool:
    """Would handling the same record fail again the same way? (Else the broker or the group is at fault.)"""
    return isinstance(err, RECORD_ERRORS) or not isinstance(err, KafkaError)


def header(headers: Sequence[tuple[str, bytes | None]], name: str) -> str:
    """A header's value as text (bytes that are not UTF-8 are replaced, a null value is empty)."""
    return next(((value or b"").decode(errors="replace") for key, value in headers if key == name), "")


def external(headers: Sequence[tuple[str, bytes | None]]) -> Headers:
    """A producer's own headers, without ours (`mll-*`): who writes to an input topic cannot steer a message."""
    return [(key, value or b"") for key, value in headers if not key.startswith("mll-")]


def with_header(headers: Sequence[tuple[str, bytes]], name: str, value: str) -> Headers:
    return [(k, v) for k, v in headers if k != name] + [(name, value.encode())]


async def dead_letter(
    producer: AIOKafkaProducer,
    table: RoutingTable,
    raw: bytes | None,
    headers: Headers,
    reason: str,
    where: str,
    told: str = "",
) -> None:
    """Park a message with why it failed (the reason bounded, the payload cut at PAYLOAD_KEPT); tell a waiting bridge.

    The bridge's caller gets `told` (default: the reason) and the record's
    `error_id`: a model's exception text stays in the dead-letter topic. A record
    still too large for the broker is parked with the reason alone.
    """
    raw, reason, error_id = raw or b"", flat(reason), uuid.uuid4().hex[:16]
    payload = raw[:PAYLOAD_KEPT].decode(errors="replace")
    record: dict[str, Any] = {"error": reason, "error_id": error_id, "where": flat(where, 200), "payload": payload}
    if len(raw) > PAYLOAD_KEPT:
        record.update(truncated=True, payload_bytes=len(raw))
    marked = with_header([(key, value or b"") for key, value in headers], h.ERROR, reason)
    try:
        await producer.send_and_wait(table.dead_letter, json.dumps(record).encode(), headers=marked)
    except RECORD_ERRORS:
        record.update(payload="", truncated=True, payload_bytes=len(raw))
        await producer.send_and_wait(table.dead_letter, json.dumps(record).encode(), headers=_ours(marked))
    answer = {"error": flat(told) if told else reason, "error_id": error_id}
    await reply(producer, headers, json.dumps(answer).encode(), marked)
    log.warning("dead-lettered pipeline=%s at=%s reason=%s", table.pipeline, flat(where, 200), reason)


def _ours(headers: Sequence[tuple[str, bytes | None]]) -> Headers:
    return [(key, value or b"") for key, value in headers if key.startswith("mll-")]


async def reply(producer: AIOKafkaProducer, headers: Headers, body: bytes, sent_headers: Headers) -> None:
    """Answer a waiting HTTP bridge, if the message came from one: only a bridge's own reply topic is used."""
    reply_to = header(headers, h.REPLY_TO)
    if not reply_to.startswith(BRIDGE_REPLY_PREFIX):
        return
    try:
        await producer.send_and_wait(reply_to, body, headers=sent_headers)
    except RECORD_ERRORS as err:  # the bridge times out and says so; the result is on the output topic
        log.warning("could not answer reply topic %s: %s", flat(reply_to, 100), err)


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


Poisoned = Callable[[Any, str], Awaitable[None]]  # (record, reason): dead-letter it


async def consume_batches(
    consumer: AIOKafkaConsumer, handle: Callable[[Any], Awaitable[None]], poisoned: Poisoned
) -> None:
    """Forever, then stop the consumer: at least once, for every hop and entry router.

    A fetched batch is handled concurrently (the producer batches the sends) and
    committed only once every message in it is acknowledged downstream or
    dead-lettered. A failure that is not the record's ends the loop uncommitted.
    """

    async def one(record: Any) -> None:
        try:
            await handle(record)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if not is_poison(err):
                raise
            reason = f"{type(err).__name__}: {err}"
            try:
                await poisoned(record, reason)
            except Exception as failed:
                if not is_poison(failed):
                    raise
                # Not even its reason can be parked: skipped, so that it cannot block the partition.
                log.error("could not dead-letter offset=%s: %s (%s)", record.offset, flat(reason), failed)

    try:
        while True:
            for partition, records in (await consumer.getmany(timeout_ms=500, max_records=500)).items():
                await asyncio.gather(*(one(record) for record in records))
                await consumer.commit({partition: records[-1].offset + 1})
    finally:
        await consumer.stop()


async def supervise(what: str, run: Callable[[], Awaitable[None]], died: Callable[[str], None]) -> None:
    """Run a consumer forever: when it dies (the broker, a rebalance), start it again with backoff."""
    backoff = Backoff(first=0.5, cap=30.0)
    while True:
        try:
            await run()
            backoff.reset()
        except asyncio.CancelledError:
            raise
        except Exception as err:
            reason = flat(f"{type(err).__name__}: {err}", 200)
            died(reason)
            log.warning("%s stopped (%s); starting it again", what, reason)
            await asyncio.sleep(backoff.next_delay())
