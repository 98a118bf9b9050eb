"""Steady load through the gateway while something happens, and which hosts the gateway has for a cluster."""

from __future__ import annotations

import asyncio
import collections
import urllib.error
import urllib.request
from typing import Any

import aiohttp

from tests.helpers.envoy import wait_for
from tests.helpers.pipelines import post

ONE_STAGE = {"name": "one", "stages": [{"name": "tok", "variants": [{"model": "tokenize", "version": "v1"}]}]}


TOKENIZE = "examples.trivial.models:tokenize"


def gateway_hosts(gateway: Any, cluster: str) -> set[str]:
    """host:port of a cluster's endpoints as the gateway Envoy knows them."""
    _, text = gateway.admin("/clusters")
    return {
        line.split("::")[1]
        for line in text.splitlines()
        if line.startswith(f"{cluster}::") and line.count("::") >= 3 and line.split("::")[2] == "cx_active"
    }


class SteadyLoad:
    """A few clients sending requests back to back; counts every outcome."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url, self.clients = url, clients
        self.outcomes: collections.Counter[int] = collections.Counter()
        self.failures: list[str] = []  # the first few answers that were not 200, to say why
        self.stop = asyncio.Event()

    async def _client(self) -> None:
        async with aiohttp.ClientSession() as session:
            while not self.stop.is_set():
                status, body, _ = await post(session, self.url, {"text": "a b"})
                self.outcomes[status] += 1
                if status != 200 and len(self.failures) < 5:
                    self.failures.append(f"{status} {str(body)[:300]}")

    async def more(self, count: int = 20, timeout: float = 30) -> None:
        """Until `count` more requests have been answered (whatever their status): the load ran through a phase."""
        target = sum(self.outcomes.values()) + count
        await wait_for(lambda: sum(self.outcomes.values()) >= target, timeout, every=0.01)

    async def __aenter__(self) -> SteadyLoad:
        self.tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


def post_status(port: int, pipeline: str, body: bytes = b'{"text": "hello"}') -> int:
    """One request through the gateway: its HTTP status (0: no answer at all)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/pipelines/{pipeline}", data=body, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return 0
