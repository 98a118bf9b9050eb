"""A runtime SDK app served on a free loopback port, with a small client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from runtime_sdk.app import Runtime, serving


class Client:
    """Requests to a runtime served on a loopback port, by path."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session, self.base = session, base

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.session.post(self.base + path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.session.get(self.base + path, **kwargs)


@asynccontextmanager
async def served(runtime: Runtime, **options: Any) -> AsyncIterator[Client]:
    async with serving(runtime, **options) as base, aiohttp.ClientSession() as session:
        yield Client(session, base)
