"""The peer: the same 3-stage pipeline (tokenize -> count -> score) as BentoML services, one worker each,
composed with `bentoml.depends` as BentoML's docs show (each service its own process, calling the next over
HTTP). Served by bench/peers.py with `.tools/bento/bin/bentoml serve bench.bento_app:Pipeline` (BentoML is
not a project dependency); the predicts are the ones in examples/trivial/models.py, written out here
because that module imports our SDK. BENTO_ACCESS_LOG=0 turns off BentoML's line per request (on by
default; ours is off by default). `EchoPipeline`: three stages that pass their input on instead
(bench/payloads.py: the transport's cost, not a model's).
"""

from __future__ import annotations

import os
from typing import Any

import bentoml

# BentoML 1.4's client to a dependency replaces its session every 100 requests (runner_connection.max_requests)
# and closes the old one with requests still in flight on it: at 32 connections about a fifth of requests
# failed with "Server disconnected" (one run: 348 of ~1,860). As Ray's in-flight limit is raised, so is this.
SERVICE = {
    "workers": 1,
    "logging": {"access": {"enabled": os.environ.get("BENTO_ACCESS_LOG", "1") == "1"}},
    "runner_connection": {"max_requests": 10**9},
}


@bentoml.service(**SERVICE)
class Tokenize:
    @bentoml.api
    def predict(self, text: str) -> dict[str, Any]:
        return {"tokens": text.split()}


@bentoml.service(**SERVICE)
class Count:
    @bentoml.api
    async def predict(self, tokens: list[str]) -> dict[str, Any]:
        return {"tokens": tokens, "count": len(tokens)}


@bentoml.service(**SERVICE)
class Score:
    @bentoml.api
    def predict(self, tokens: list[str], count: int) -> dict[str, Any]:
        return {"count": count, "score": count * 10}


@bentoml.service(**SERVICE)
class Pipeline:
    tokenize = bentoml.depends(Tokenize)
    count = bentoml.depends(Count)
    score = bentoml.depends(Score)

    @bentoml.api(route="/")
    async def run(self, text: str) -> dict[str, Any]:
        tokens = await self.tokenize.to_async.predict(text=text)
        counted = await self.count.to_async.predict(**tokens)
        return await self.score.to_async.predict(**counted)


@bentoml.service(**SERVICE)
class Echo1:
    @bentoml.api
    def predict(self, text: str) -> dict[str, Any]:
        return {"text": text}


@bentoml.service(**SERVICE)
class Echo2:  # (a service class each: BentoML runs one process per service, as the other pipeline has)
    @bentoml.api
    def predict(self, text: str) -> dict[str, Any]:
        return {"text": text}


@bentoml.service(**SERVICE)
class Echo3:
    @bentoml.api
    def predict(self, text: str) -> dict[str, Any]:
        return {"text": text}


@bentoml.service(**SERVICE)
class EchoPipeline:
    first = bentoml.depends(Echo1)
    second = bentoml.depends(Echo2)
    third = bentoml.depends(Echo3)

    @bentoml.api(route="/")
    async def run(self, text: str) -> dict[str, Any]:
        for stage in (self.first, self.second, self.third):
            text = (await stage.to_async.predict(text=text))["text"]
        return {"text": text}
