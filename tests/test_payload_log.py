"""Payload logging: sampling, the records, and the bounds (queue, body size, file rotation)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest

from controlplane.pipeline.model import InvalidPipeline
from controlplane.pipeline.spec import parse_pipeline
from runtime_sdk.payload_log import MAX_BODY_CHARS, MAX_QUEUED, PayloadLog, body_value, sampled


def test_sampling_follows_the_gateways_percentage_and_ignores_anything_else() -> None:
    rng = random.Random(5).random
    share = sum(sampled("10", rng) for _ in range(20_000)) / 20_000
    assert abs(share - 0.10) < 0.01
    assert not any(sampled(bad) for bad in ("", "nan", "-5", "150", "ten", "0"))
    assert all(sampled("100") for _ in range(100))


def test_bodies_are_kept_as_json_and_cut_when_long() -> None:
    assert body_value(b'{"a": 1}') == {"a": 1}
    assert body_value(b"not json") == "not json"
    long = body_value(b"x" * (MAX_BODY_CHARS + 10))
    assert long["truncated"] is True and long["bytes"] == MAX_BODY_CHARS + 10 and len(long["head"]) == MAX_BODY_CHARS


async def test_a_full_queue_drops_and_counts_and_files_rotate_within_their_limit(tmp_path: Path) -> None:
    payloads = PayloadLog(tmp_path / "logs", max_bytes=4096)
    for i in range(MAX_QUEUED + 50):  # all offered before the writer runs once
        payloads.offer("p", {"i": i, "pad": "x" * 100})
    assert payloads.dropped == 50
    await payloads.close()
    assert payloads.written == MAX_QUEUED
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files == ["p.jsonl", "p.jsonl.1"]  # at most twice the limit on disk
    assert all((tmp_path / "logs" / f).stat().st_size <= 4096 for f in files)
    last = [json.loads(line) for line in (tmp_path / "logs" / "p.jsonl").read_text().splitlines()]
    assert last[-1]["i"] == MAX_QUEUED - 1
    assert oct((tmp_path / "logs").stat().st_mode & 0o777) == "0o700"  # user data


def test_logging_is_validated_and_refused_for_kafka() -> None:
    stages = [{"name": "a", "variants": [{"model": "m", "version": "v1"}]}]
    assert parse_pipeline({"name": "p", "stages": stages, "logging": {"percent": 5}}).log_percent == 5
    for spec, problem in [
        ({"logging": {"percent": 150}}, "logging.percent: must be between 0 and 100"),
        ({"logging": {"rate": 5}}, "logging.rate: unknown field"),
        ({"logging": {"percent": 5}, "transport": "kafka"}, "logging: payloads are logged by the first stage"),
    ]:
        with pytest.raises(InvalidPipeline, match=problem.replace("(", r"\(")):
            parse_pipeline({"name": "p", "stages": stages, **spec})


async def test_offer_never_waits(tmp_path: Path) -> None:
    payloads = PayloadLog(tmp_path)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(MAX_QUEUED * 3):
        payloads.offer("p", {"i": i})
    assert loop.time() - started < 1.0
    await payloads.close()
