"""Tiny models for trying pipelines out: tokenize -> count -> score, plus a branch and failures."""

from __future__ import annotations

import asyncio
from typing import Any

from runtime_sdk import Rejected


def tokenize(payload: dict[str, Any]) -> dict[str, Any]:
    text = payload.get("text")
    if not isinstance(text, str):
        raise Rejected("expected {'text': '<a string>'}")
    return {"tokens": text.split()}


async def count(payload: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0)  # async predicts work too
    return {"tokens": payload["tokens"], "count": len(payload["tokens"])}


def score(payload: dict[str, Any]) -> dict[str, Any]:
    return {"count": payload["count"], "score": payload["count"] * 10}


def score_v2(payload: dict[str, Any]) -> dict[str, Any]:
    return {"count": payload["count"], "score": payload["count"] * 100}


def length_class(payload: dict[str, Any]) -> dict[str, Any]:
    """A classifier: its `category` picks the next stage's branch."""
    return {**payload, "category": "long" if payload["count"] > 3 else "short"}


def short_model(payload: dict[str, Any]) -> dict[str, Any]:
    return {"category": payload["category"], "answer": "short text"}


def long_model(payload: dict[str, Any]) -> dict[str, Any]:
    return {"category": payload["category"], "answer": "long text"}


def broken(payload: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("this model always fails")


class _BreaksTheHop(dict):  # type: ignore[type-arg]
    """An output whose serialisation raises what a lost broker connection raises (a fault, not the record's).
    Made with a key orjson does not write (a tuple), it goes to the standard library, which calls `items`."""

    def items(self) -> Any:
        from aiokafka.errors import KafkaConnectionError

        raise KafkaConnectionError("injected: the connection to the broker was lost")


_calls = {"flaky": 0}


def flaky_once(payload: dict[str, Any]) -> dict[str, Any]:
    """Counts like `count`, but its first answer breaks the Kafka hop it travels on (tests restart the consumer)."""
    _calls["flaky"] += 1
    result = {"tokens": payload["tokens"], "count": len(payload["tokens"])}
    if _calls["flaky"] == 1:
        broken: dict[Any, Any] = {**result, (0,): 0}
        return _BreaksTheHop(broken)
    return result


async def cpu_hog(payload: dict[str, Any]) -> dict[str, Any]:
    """An `async def` that computes for 1.5 s without awaiting: it holds the event loop (a common mistake)."""
    import time

    until = time.perf_counter() + 1.5
    spins = 0
    while time.perf_counter() < until:
        spins += 1
    return {"spins": spins}


def echo(payload: dict[str, Any]) -> dict[str, Any]:
    """Passes its input on unchanged (a stage to insert in front of others)."""
    return payload


def fails_30(payload: dict[str, Any]) -> dict[str, Any]:
    """A bad candidate: like `echo`, but 30% of its answers are errors."""
    import random

    if random.random() < 0.3:
        raise RuntimeError("candidate bug")
    return payload


async def slow_echo(payload: dict[str, Any]) -> dict[str, Any]:
    """A slow candidate: like `echo`, 50 ms later."""
    await asyncio.sleep(0.05)
    return payload


def longest(payload: dict[str, Any]) -> dict[str, Any]:
    """An ensemble member: the longest token."""
    return {"longest": max(payload["tokens"], key=len, default="")}


async def sleepy(payload: dict[str, Any]) -> dict[str, Any]:
    """An ensemble member that answers too late for any short timeout."""
    await asyncio.sleep(2)
    return {"slept": True}


def join_answers(payload: dict[str, Any]) -> dict[str, Any]:
    """An ensemble's join: one answer from the members' (`_missing` lists the optional ones left out)."""
    return {
        "count": payload["a"]["count"],
        "longest": payload["b"]["longest"],
        "left_out": sorted(payload.get("_missing", {})),
    }


_flips = {"n": 0}


def length_class_flips(payload: dict[str, Any]) -> dict[str, Any]:
    """A candidate classifier that answers the other category for one request in five (for agreement tests)."""
    answer = length_class(payload)
    _flips["n"] += 1
    if _flips["n"] % 5 == 0:
        answer["category"] = "short" if answer["category"] == "long" else "long"
    return answer


async def paced(payload: dict[str, Any]) -> dict[str, Any]:
    """Takes `ms` milliseconds of the request (at most 2 s), as a model of that cost would."""
    await asyncio.sleep(min(2000, max(0, float(payload.get("ms", 0)))) / 1000)
    return payload
