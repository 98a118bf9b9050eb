"""10,000 hostile payloads and Kafka records against a live pipeline: nothing crashes, no good message is lost.

The payloads are generated from a fixed seed (so a failure can be replayed):
random bytes, broken and deeply nested JSON, wrong types, huge strings, control
and non-UTF-8 characters, tombstones, forged `mll-*` headers. Good messages are
mixed in, and each must come out with the right answer.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from contract.payload import NotAnObject, parse_object
from tests.helpers.components import passing
from tests.helpers.kafka import consume, send
from tests.helpers.pipelines import M, apply, in_traffic, pipeline, until_ok

pytestmark = pytest.mark.slow
HOSTILE = 10_000
GOOD = 500


def hostile(rng: random.Random) -> bytes | None:
    kind = rng.randrange(12)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 2000))
    if kind == 1:
        depth = rng.choice([10, 1_000, 5_000, 20_000])
        return b"[" * depth + b"]" * depth
    if kind == 2:
        return json.dumps({"text": rng.choice([None, 1, [], {}, True, 1e308])}).encode()
    if kind == 3:
        return json.dumps({"text": "x" * rng.randrange(10_000, 200_000)}).encode()
    if kind == 4:
        return json.dumps({"text": "".join(chr(rng.randrange(0, 0x3000)) for _ in range(50))}).encode()
    if kind == 5:
        return b'{"text": "a\\u0000b\\ud800"}'
    if kind == 6:
        return b"NaN" if rng.random() < 0.5 else b'{"text": NaN}'
    if kind == 7:
        return None  # a tombstone (Kafka); an empty body (HTTP)
    if kind == 8:
        return json.dumps([{"text": "a"}] * rng.randrange(1, 50)).encode()
    if kind == 9:
        return b'{"text": "a b"' + rng.randbytes(5)
    if kind == 10:
        return json.dumps({"text": "a b", **{f"k{i}": i for i in range(rng.randrange(1, 2000))}}).encode()
    return b"\xef\xbb\xbf" + json.dumps({"text": 7}).encode()


def score_of(value: bytes | None) -> int | None:
    """What the pipeline answers for `value`, or None if it must refuse it."""
    try:
        text = parse_object(value).get("text")
    except NotAnObject:
        return None
    return len(text.split()) * 10 if isinstance(text, str) else None


async def test_ten_thousand_hostile_payloads_crash_nothing_and_lose_no_good_message(
    kafka_plane: Any, kafka_bootstrap: str, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    runtimes = passing(*(start_runtime(f"{M}:{m}", m, "v1", wait=False) for m in ("tokenize", "count", "score")))
    apply(kafka_plane, tmp_path, pipeline("fz"))
    apply(kafka_plane, tmp_path, {**pipeline("fk", transport="kafka"), "output_topic": "fk-out"})
    url = f"http://127.0.0.1:{kafka_plane.gateway_port}/pipelines/fz"
    await until_ok(url, {"text": "a b"})
    await in_traffic(kafka_plane, "fk", 1)
    rng = random.Random(20261126)
    payloads = [hostile(rng) for _ in range(HOSTILE)]
    good = [json.dumps({"text": " ".join(["w"] * (1 + i % 7))}).encode() for i in range(GOOD)]

    # HTTP: the gateway and every hop answer each hostile body with a 4xx (or 200 when it is valid after all).
    statuses: dict[int, int] = {}
    answers: list[Any] = []
    limit = asyncio.Semaphore(16)
    async with aiohttp.ClientSession() as session:

        async def call(body: bytes, keep: bool) -> None:
            async with limit, session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                if keep:
                    answers.append((json.loads(body), resp.status, await resp.json()))

        jobs = [call(p or b"", False) for p in payloads] + [call(g, True) for g in good]
        rng.shuffle(jobs)
        await asyncio.gather(*jobs)
    assert not {s for s in statuses if s >= 500}, statuses  # no hostile body made anything fail
    for sent, status, body in answers:
        words = len(sent["text"].split())
        assert (status, body) == (200, {"count": words, "score": words * 10})

    # Kafka: straight onto the input topic, forged headers included.
    forged = [("mll-reply-to", b"fk-stolen"), ("mll-version", b"\xff"), ("x-user", b"\xfe")]
    records = [(p, forged if i % 3 == 0 else []) for i, p in enumerate(payloads)]
    records += [(g, []) for g in good]
    rng.shuffle(records)
    await send(kafka_bootstrap, "mll.fk.in", records)
    expected = sorted(s for value, _ in records if (s := score_of(value)) is not None)  # good ones + valid hostile
    assert len(expected) >= GOOD
    results = await consume(kafka_bootstrap, "fk-out", len(expected), timeout=240)
    assert sorted(json.loads(r.value)["score"] for r in results) == expected
    assert len(await consume(kafka_bootstrap, "fk-out", len(expected) + 1, timeout=3, missing_ok=True)) == len(
        expected
    )  # and nothing twice

    for runtime in runtimes:
        assert runtime.proc.popen.poll() is None, f"{runtime.service_id} died"
    assert kafka_plane.proc.popen.poll() is None
    print(f"\nfuzz: HTTP {dict(sorted(statuses.items()))}; Kafka {len(records)} records -> {len(expected)} results")
