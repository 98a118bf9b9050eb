"""A runtime's output goes to the host's shared Envoy when it is there, else to its own sidecar
(runtime_sdk/egress.py; docs/architecture.md, "One Envoy for the host"). Here both are small HTTP servers on
Unix sockets, so each way the shared one can fail is made on purpose; tests/test_colocated_e2e.py runs the same
fallback against real Envoys while the control plane takes the shared listeners away under load."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

from contract import headers as h
from runtime_sdk.egress import SHARED_RETRY_S, Egress
from tests.helpers.paths import short_dir

Reply = Callable[[web.Request], web.StreamResponse]


@asynccontextmanager
async def serving(path: Path, reply: Reply, seen: list[str]) -> AsyncIterator[None]:
    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        return reply(request)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    try:
        yield
    finally:
        await runner.cleanup()


async def test_what_the_shared_envoy_cannot_do_goes_to_the_own_sidecar_and_what_it_answers_stands() -> None:
    folder = short_dir()
    shared_path, own_path = folder / "r@host.sock", folder / "r-egress.sock"
    shared_seen: list[str] = []
    own_seen: list[str] = []
    answers = {"status": 200, "marked": False, "hang_up": False}

    def shared_reply(request: web.Request) -> web.StreamResponse:
        if answers["hang_up"] and request.transport is not None:
            request.transport.close()  # closed without an answer, as a draining listener closes an idle connection
        marked = {h.RETRIABLE: "true"} if answers["marked"] else {}
        return web.json_response({"via": "shared"}, status=int(answers["status"]), headers=marked)

    def own_reply(request: web.Request) -> web.StreamResponse:
        return web.json_response({"via": "own"})

    egress = Egress(uds_path=str(own_path))  # the shared socket is next to it: r@host.sock
    await egress.start()
    try:
        async with serving(own_path, own_reply, own_seen):
            # No shared socket (the gateway is not carrying this runtime): the own sidecar.
            status, body, _ = await egress.post("uds", "/pipelines/p/v1/b", "{}", {})
            assert (status, body) == (200, b'{"via": "own"}') and own_seen == ["/pipelines/p/v1/b"]
            async with serving(shared_path, shared_reply, shared_seen):
                # Refused a moment ago: the sidecar keeps it for SHARED_RETRY_S, then the shared Envoy again.
                await egress.post("uds", "/x", "{}", {})
                assert shared_seen == [] and len(own_seen) == 2
                egress.shared_after -= SHARED_RETRY_S
                status, body, _ = await egress.post("uds", "/x", "{}", {})
                assert (status, body, len(shared_seen)) == (200, b'{"via": "shared"}', 1)
                # A 503 that is not Envoy's own (a model's, say) got past it: it stands, nothing is sent twice.
                answers["status"] = 503
                status, _, _ = await egress.post("uds", "/x", "{}", {})
                assert (status, len(shared_seen), len(own_seen)) == (503, 2, 2)
                # Envoy's own 503 (marked retriable; e.g. the cluster just left the gateway): to the sidecar.
                answers["marked"] = True
                status, body, _ = await egress.post("uds", "/x", "{}", {})
                assert (status, body, len(shared_seen), len(own_seen)) == (200, b'{"via": "own"}', 3, 3)
                await egress.post("uds", "/x", "{}", {})
                assert (len(shared_seen), len(own_seen)) == (3, 4)  # and stays there for a while
                # A connection closed without an answer: to the sidecar.
                egress.shared_after -= SHARED_RETRY_S
                answers.update(marked=False, status=200, hang_up=True)
                status, body, _ = await egress.post("uds", "/x", "{}", {})
                assert (status, body, len(shared_seen), len(own_seen)) == (200, b'{"via": "own"}', 4, 5)
    finally:
        await egress.close()
