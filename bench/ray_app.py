"""The peer: the same 3-stage pipeline (tokenize -> count -> score) as Ray Serve deployments, one replica
each, composed with DeploymentHandles as Ray's docs show. Run by bench/peers.py with the Python of
.tools/ray (Ray is not a project dependency); the predicts are the ones in examples/trivial/models.py,
written out here because that module imports our SDK.

`echo`: three stages that pass their input on instead (bench/payloads.py: the transport's cost, not a model's).

Usage: .tools/ray/bin/python bench/ray_app.py PORT [echo]
"""

from __future__ import annotations

import sys
import time
from typing import Any

import ray
from ray import serve
from starlette.requests import Request

# Four replicas on a 2-CPU Ray node: each asks for a quarter of a CPU so that all of them are placed
# (Serve's default of one CPU each would leave two pending); the OS shares the cores as it does for ours.
SHARE = {"num_cpus": 0.25}
# Serve's default (5 requests in flight per replica) makes its router back off and retry when 32
# connections arrive: about 10 requests/s with timeouts here. Ray's performance guide raises it.
ONGOING = 64


@serve.deployment(ray_actor_options=SHARE, max_ongoing_requests=ONGOING)
class Tokenize:
    def __call__(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"tokens": payload["text"].split()}


@serve.deployment(ray_actor_options=SHARE, max_ongoing_requests=ONGOING)
class Count:
    async def __call__(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"tokens": payload["tokens"], "count": len(payload["tokens"])}


@serve.deployment(ray_actor_options=SHARE, max_ongoing_requests=ONGOING)
class Score:
    def __call__(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"count": payload["count"], "score": payload["count"] * 10}


@serve.deployment(ray_actor_options=SHARE, max_ongoing_requests=ONGOING)
class Pipeline:
    def __init__(self, tokenize: Any, count: Any, score: Any) -> None:
        self.tokenize, self.count, self.score = tokenize, count, score

    async def __call__(self, request: Request) -> dict[str, Any]:
        tokens = await self.tokenize.remote(await request.json())
        counted = await self.count.remote(tokens)
        return await self.score.remote(counted)


@serve.deployment(ray_actor_options=SHARE, max_ongoing_requests=ONGOING)
class Echo:
    def __call__(self, payload: dict[str, Any]) -> dict[str, Any]:
        return payload


@serve.deployment(ray_actor_options=SHARE, max_ongoing_requests=ONGOING)
class Chain:
    def __init__(self, first: Any, second: Any, third: Any) -> None:
        self.stages = (first, second, third)

    async def __call__(self, request: Request) -> dict[str, Any]:
        payload = await request.json()
        for stage in self.stages:
            payload = await stage.remote(payload)
        return payload


def main() -> None:
    port = int(sys.argv[1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    if sys.argv[2:] == ["echo"]:
        app = Chain.bind(Echo.bind(), Echo.bind(), Echo.bind())  # type: ignore[attr-defined]
    else:
        app = Pipeline.bind(Tokenize.bind(), Count.bind(), Score.bind())  # type: ignore[attr-defined]
    serve.run(app, route_prefix="/")
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
