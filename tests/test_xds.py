"""The xDS server against a real Envoy, in state-of-the-world and delta modes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from envoy.type.matcher.v3 import regex_pb2

from controlplane.node import processes
from controlplane.node.sidecar import render_bootstrap
from controlplane.translate import resources as r
from controlplane.xds.acks import AckBook
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.server import XdsServer
from controlplane.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot
from tests.helpers.envoy import config_dump, dynamic_names, get_json, http_backend, wait_for

pytestmark = pytest.mark.slow
NODE = "node-1"


@dataclass
class Xds:
    cache: SnapshotCache
    acks: AckBook
    server: XdsServer
    port: int

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def acked(self, version: str, *types: str) -> bool:
        acked = {s.type_url: s.acked_version for s in self.acks.for_node(NODE)}
        return all(acked.get(t) == version for t in types or (CLUSTER, ENDPOINT, LISTENER, ROUTE))


@pytest.fixture
async def xds() -> AsyncIterator[Xds]:
    cache, acks, port = SnapshotCache(), AckBook(), processes.free_port()
    server = await XdsServer(cache, acks, f"127.0.0.1:{port}").start()
    holder = Xds(cache, acks, server, port)
    yield holder
    await holder.server.stop(0)


@pytest.fixture(params=["sotw", "delta"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def start_sidecar(start_envoy: Any, xds: Xds, mode: str) -> Any:
    def render(admin_port: int) -> str:
        return render_bootstrap(NODE, "test", xds.addr, admin_port, delta=mode == "delta")

    return await asyncio.to_thread(start_envoy, render)


def snapshot(version: str, listen: int, backends: dict[str, int], *routes: Any) -> Snapshot:
    return Snapshot.build(
        version,
        clusters=[r.eds_cluster(name) for name in backends],
        endpoints=[r.load_assignment(n, [r.tcp_address("127.0.0.1", p)]) for n, p in backends.items()],
        listeners=[r.http_listener("ingress", r.tcp_address("127.0.0.1", listen), "ingress")],
        routes=[r.route_config("ingress", list(routes))],
    )


def shown_version(snap: Snapshot, type_url: str, name: str, mode: str) -> str:
    """What Envoy's config_dump shows: the snapshot version (SotW) or the resource's (delta)."""
    return snap.version if mode == "sotw" else snap.of_type(type_url).versions[name]


async def test_envoy_gets_config_and_proxies_through_it(xds: Xds, start_envoy: Any, mode: str) -> None:
    listen = processes.free_port()
    async with http_backend("a") as port_a:
        xds.cache.set_snapshot(
            NODE,
            snapshot("v1", listen, {"model-a": port_a}, r.weighted_route("/", [("model-a", 1)])),
        )
        await start_sidecar(start_envoy, xds, mode)
        status, body = await get_json(f"http://127.0.0.1:{listen}/predict")
        assert (status, body["backend"]) == (200, "a")
        await wait_for(lambda: xds.acked("v1"))


async def test_changes_reach_envoy_and_removed_resources_disappear(xds: Xds, start_envoy: Any, mode: str) -> None:
    listen = processes.free_port()
    async with http_backend("a") as port_a, http_backend("b") as port_b:
        v1 = snapshot(
            "v1",
            listen,
            {"model-a": port_a, "old": port_a},
            r.weighted_route("/", [("model-a", 1), ("old", 1)]),
        )
        xds.cache.set_snapshot(NODE, v1)
        envoy = await start_sidecar(start_envoy, xds, mode)
        await wait_for(lambda: xds.acked("v1"))

        split = r.weighted_route("/", [("model-a", 50), ("model-b", 50)])
        v2 = snapshot("v2", listen, {"model-a": port_a, "model-b": port_b}, split)
        xds.cache.set_snapshot(NODE, v2)
        await wait_for(lambda: set(dynamic_names(config_dump(envoy.admin_port), "clusters")) == {"model-a", "model-b"})
        dump = config_dump(envoy.admin_port)
        assert dynamic_names(dump, "routes") == {"ingress": shown_version(v2, ROUTE, "ingress", mode)}
        assert dynamic_names(dump, "clusters")["model-b"] == shown_version(v2, CLUSTER, "model-b", mode)

        seen = set()
        for _ in range(40):
            status, body = await get_json(f"http://127.0.0.1:{listen}/")
            assert status == 200
            seen.add(body["backend"])
        assert seen == {"a", "b"}


async def test_rejected_config_is_recorded_and_envoy_keeps_serving(xds: Xds, start_envoy: Any, mode: str) -> None:
    listen = processes.free_port()
    async with http_backend("a") as port_a:
        good = r.weighted_route("/", [("model-a", 1)])
        v1 = snapshot("v1", listen, {"model-a": port_a}, good)
        xds.cache.set_snapshot(NODE, v1)
        envoy = await start_sidecar(start_envoy, xds, mode)
        await wait_for(lambda: xds.acked("v1"))

        bad = r.weighted_route("/", [("model-a", 1)])
        bad.match.ClearField("prefix")
        bad.match.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex="(unclosed"))
        xds.cache.set_snapshot(NODE, snapshot("v2", listen, {"model-a": port_a}, bad, good))

        nack = await wait_for(lambda: [s for s in xds.acks.nacks() if s.type_url == ROUTE])
        assert nack[0].nack_version == "v2"
        assert "(unclosed" in nack[0].nack_error
        route_v1 = shown_version(v1, ROUTE, "ingress", mode)
        assert dynamic_names(config_dump(envoy.admin_port), "routes") == {"ingress": route_v1}
        status, body = await get_json(f"http://127.0.0.1:{listen}/still-ok")
        assert (status, body["backend"]) == (200, "a")

        # The rejected version is not pushed again in a loop.
        await asyncio.sleep(1.5)  # an observation window: a loop would have pushed it again within it
        _, stats = envoy.admin("/stats?filter=rds.ingress.update_rejected")
        assert stats.strip().endswith(": 1"), stats


async def test_control_plane_restart_loses_no_request(xds: Xds, start_envoy: Any, mode: str) -> None:
    listen = processes.free_port()
    async with http_backend("a") as port_a:
        v1 = snapshot("v1", listen, {"model-a": port_a}, r.weighted_route("/", [("model-a", 1)]))
        xds.cache.set_snapshot(NODE, v1)
        await start_sidecar(start_envoy, xds, mode)
        await wait_for(lambda: xds.acked("v1"))

        counts = {"ok": 0, "failed": 0}
        stop = asyncio.Event()

        async def traffic() -> None:
            async with aiohttp.ClientSession() as http:
                while not stop.is_set():
                    async with http.get(f"http://127.0.0.1:{listen}/") as resp:
                        counts["ok" if resp.status == 200 else "failed"] += 1
                    await asyncio.sleep(0.005)

        load = asyncio.create_task(traffic())
        await wait_for(lambda: counts["ok"] >= 20)  # traffic flows before the server stops
        await xds.server.stop(0)
        await asyncio.sleep(1.5)  # Envoy serves from its last config meanwhile

        xds.cache, xds.acks = SnapshotCache(), AckBook()
        xds.cache.set_snapshot(NODE, v1)
        xds.server = await XdsServer(xds.cache, xds.acks, xds.addr).start()
        await wait_for(lambda: xds.acks.is_connected(NODE) and xds.acked("v1"), timeout=30)
        await asyncio.sleep(0.3)  # load duration: traffic on the new server's config too
        stop.set()
        await load
        assert counts["failed"] == 0
        assert counts["ok"] > 50


async def test_envoy_that_connects_before_its_snapshot_exists_gets_it_when_set(
    xds: Xds, start_envoy: Any, mode: str
) -> None:
    listen = processes.free_port()
    async with http_backend("late") as port:
        envoy = await asyncio.to_thread(
            start_envoy,
            lambda admin: render_bootstrap(NODE, "test", xds.addr, admin, delta=mode == "delta"),
            wait_live=False,
        )
        await wait_for(lambda: xds.acks.is_connected(NODE))
        await asyncio.sleep(0.3)  # simulated lateness: Envoy has asked and waits before any snapshot exists
        xds.cache.set_snapshot(NODE, snapshot("v1", listen, {"model-a": port}, r.weighted_route("/", [("model-a", 1)])))
        await wait_for(lambda: envoy.admin("/ready")[1].strip() == "LIVE")
        status, body = await get_json(f"http://127.0.0.1:{listen}/")
        assert (status, body["backend"]) == (200, "late")


def test_the_ack_book_forgets_nodes_gone_longer_than_its_limit_and_keeps_the_others() -> None:
    import time

    book = AckBook(forget_after=0.05)
    for node in ("gone", "back", "here"):
        book.connected(node, 1)
        book.joined(node, frozenset({"envoy.filters.network.kafka_broker"}))
        book.nack(node, node, CLUSTER, "v1", "rejected")
    book.connected("gone", -1)
    book.connected("back", -1)
    assert {s.node_id for s in book.all()} == {"gone", "back", "here"}  # not at once: it may come back
    book.connected("back", 1)
    time.sleep(0.1)  # time passing is what is tested: past forget_after
    assert {s.node_id for s in book.all()} == {"back", "here"}
    assert set(book.extensions) == {"back", "here"}


def test_the_ack_book_forgets_in_order_of_leaving(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes are forgotten oldest first (not by scanning every node gone at each close): one that left, came back
    and left again later is kept while one that left in between is forgotten."""
    now = [1000.0]
    monkeypatch.setattr("controlplane.xds.acks.time.monotonic", lambda: now[0])
    book = AckBook(forget_after=10)
    for node in ("back", "here"):
        book.connected(node, 1)
        book.ack(node, node, CLUSTER, "v1")
    book.connected("back", -1)  # t=1000
    now[0] = 1003
    book.connected("here", -1)  # t=1003
    now[0] = 1005
    book.connected("back", 1)
    book.connected("back", -1)  # t=1005: now the last to have left
    now[0] = 1014  # "here" left 11 s ago, "back" 9 s ago
    assert {s.node_id for s in book.all()} == {"back"}
    now[0] = 1016
    assert book.all() == [] and book.gone_since("back") is None


async def test_a_stream_cannot_change_its_node(xds: Xds) -> None:
    """ACKs and NACKs count only for the node a stream opened as."""
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    xds.cache.set_snapshot(NODE, snapshot("v1", processes.free_port(), {}))
    channel = grpc.aio.insecure_channel(xds.addr)
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)

    def ask(node: str) -> Any:
        return discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=node), type_url=LISTENER)

    call = stub.StreamAggregatedResources(iter([ask(NODE), ask("gateway")]))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in call:
            pass
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "asked as 'gateway'" in (refused.value.details() or "")
    assert xds.acks.for_node("gateway") == []  # nothing recorded for the node it claimed

    await channel.close()


async def test_a_stream_that_asks_for_type_after_type_is_ended(xds: Xds) -> None:
    """What a stream remembers grows with the types it asks for: past MAX_TYPES (or a type url of any length)
    it is ended with the reason, before anything of the extra type is kept."""
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    from controlplane.xds.streams import MAX_TYPES

    xds.cache.set_snapshot(NODE, snapshot("v1", processes.free_port(), {}))
    channel = grpc.aio.insecure_channel(xds.addr)
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    for urls in ([f"type.example/t{i}" for i in range(MAX_TYPES + 1)], ["type.example/" + "x" * 300]):
        asks = [discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=NODE), type_url=url) for url in urls]
        answered = 0
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.StreamAggregatedResources(iter(asks)):
                answered += 1
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "resource types" in (refused.value.details() or "") and answered <= MAX_TYPES
    await channel.close()


async def test_a_stream_reads_a_bounded_number_of_requests_ahead() -> None:
    """A client that sends without end while its responses are not taken: the server stops reading."""
    from controlplane.xds.streams import MAX_PENDING, SotwStream

    cache, acks = SnapshotCache(), AckBook()
    cache.set_snapshot(NODE, snapshot("v1", processes.free_port(), {}))
    sent = 0

    async def endless() -> AsyncIterator[Any]:
        nonlocal sent
        from envoy.config.core.v3 import base_pb2
        from envoy.service.discovery.v3 import discovery_pb2

        while True:
            sent += 1
            yield discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=NODE), type_url=LISTENER)
            await asyncio.sleep(0)

    responses = SotwStream(cache, acks, iter(range(1, 10**9))).run(endless())
    await anext(responses)  # the first answer; then nobody takes the next one
    await asyncio.sleep(0.5)  # an observation window: an unbounded reader would read on within it
    assert sent <= MAX_PENDING + 2, sent
    await responses.aclose()
