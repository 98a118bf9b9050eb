"""ADS over gRPC: state-of-the-world and incremental (delta) streams.

Protocol facts this follows (envoy/api/envoy/service/discovery/v3):
- A request whose `response_nonce` is not the latest one sent for its type is
  stale and ignored; one with `error_detail` is a NACK of that response.
- After a NACK the server waits for the next snapshot instead of re-sending
  the rejected version (go-control-plane #962 re-sent it in a loop).
- CDS and LDS are wildcard (SotW responses carry the full set); EDS and RDS
  are subscribed by name and a missing name is not a removal.
- On a change: clusters, endpoints, listeners, routes; clusters that
  disappear are kept until the listener/route push that stops using them is
  acknowledged, so Envoy never routes to a cluster it has just dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.xds.acks import AckBook
from controlplane.xds.cache import SNAPSHOT_CHANGED, SnapshotCache
from controlplane.xds.snapshot import (
    CLUSTER,
    LISTENER,
    NAMED_TYPES,
    PUSH_ORDER,
    ROUTE,
    Snapshot,
    short,
)

log = logging.getLogger("mllambda.xds")
_END = object()


@dataclass
class TypeState:
    """What one stream has been sent of one resource type."""

    wildcard: bool
    names: set[str] = field(default_factory=set)
    known: dict[str, str] | None = None  # name -> version the client has (None: nothing sent)
    nonce: str = ""
    version: str = ""
    answered: bool = False  # Envoy waits for a first response per type, even an empty one

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names


class _Stream:
    """Shared loop: requests and snapshot changes arrive on one queue, in order."""

    def __init__(self, cache: SnapshotCache, acks: AckBook, nonces: Iterable[int]) -> None:
        self.cache = cache
        self.acks = acks
        self._nonces = iter(nonces)
        self.types: dict[str, TypeState] = {}
        self.node_id = ""
        self.group = ""
        self.snapshot: Snapshot | None = None  # last one pushed to this stream
        self._cleanup_nonces: set[str] = set()  # listener/route pushes gating cluster removal

    def next_nonce(self) -> str:
        return str(next(self._nonces))

    async def run(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        queue: asyncio.Queue[object] = asyncio.Queue()
        reader = asyncio.create_task(self._read(requests, queue))
        try:
            while (item := await queue.get()) is not _END:
                if item is SNAPSHOT_CHANGED:
                    responses = self._on_snapshot()
                else:
                    if not self.node_id:
                        self._join(item, queue)
                    responses = self.on_request(item)
                for response in responses:
                    yield response
        finally:
            reader.cancel()
            if self.group:
                self.cache.unwatch(self.group, queue)
                self.acks.connected(self.node_id, -1, self.mode)
                log.info("stream closed node=%s", self.node_id)

    async def _read(self, requests: AsyncIterator[Any], queue: asyncio.Queue[object]) -> None:
        try:
            async for request in requests:
                queue.put_nowait(request)
        except Exception as err:  # the client went away; the stream ends either way
            log.debug("stream read ended node=%s: %s", self.node_id, err)
        finally:
            queue.put_nowait(_END)

    def _join(self, request: Any, queue: asyncio.Queue[object]) -> None:
        self.node_id = request.node.id or "unknown"
        self.group = self.cache.group_of(request.node)
        self.cache.watch(self.group, queue)
        self.acks.connected(self.node_id, +1, self.mode)
        self.acks.joined(self.node_id, frozenset(e.name for e in request.node.extensions))
        log.info("stream opened node=%s group=%s mode=%s", self.node_id, self.group, self.mode)

    def _on_snapshot(self) -> list[Any]:
        snapshot = self.cache.get(self.group)
        if snapshot is None or snapshot is self.snapshot:
            return []
        previous, self.snapshot = self.snapshot, snapshot
        responses = []
        for type_url in PUSH_ORDER:
            state = self.types.get(type_url)
            if state is not None:
                keep_from = previous if type_url == CLUSTER else None
                response = self.respond(type_url, state, keep_from, force=not state.answered)
                if response is not None:
                    responses.append(response)
        gating = {r.nonce for r in responses if r.type_url in (LISTENER, ROUTE)}
        if self._keeps_removed_clusters():
            if gating:
                self._cleanup_nonces = gating
            else:
                responses += self._drop_removed_clusters()
        return responses

    def _keeps_removed_clusters(self) -> bool:
        state = self.types.get(CLUSTER)
        if state is None or state.known is None or self.snapshot is None:
            return False
        return bool(set(state.known) - set(self.snapshot.of_type(CLUSTER).versions))

    def _drop_removed_clusters(self) -> list[Any]:
        self._cleanup_nonces = set()
        state = self.types.get(CLUSTER)
        if state is None:
            return []
        response = self.respond(CLUSTER, state, None)
        return [response] if response is not None else []

    def handle_ack(self, request: Any, state: TypeState, version: str) -> list[Any]:
        """Record an ACK or NACK of the latest response; maybe finish a cluster removal."""
        type_url = request.type_url
        if request.HasField("error_detail"):
            self.acks.nack(self.node_id, self.group, type_url, state.version, request.error_detail.message)
            self._cleanup_nonces.discard(request.response_nonce)
            return []
        self.acks.ack(self.node_id, self.group, type_url, version)
        if request.response_nonce in self._cleanup_nonces:
            self._cleanup_nonces.discard(request.response_nonce)
            if not self._cleanup_nonces:
                return self._drop_removed_clusters()
        return []

    def selection(self, type_url: str, state: TypeState, keep_from: Snapshot | None) -> dict[str, tuple[str, Any]]:
        """name -> (version, packed resource) this stream should have now."""
        assert self.snapshot is not None
        chosen = {
            name: (version, self.snapshot.packed(type_url, name))
            for name, version in self.snapshot.of_type(type_url).versions.items()
            if state.wants(name)
        }
        if keep_from is not None and state.known:
            old = keep_from.of_type(type_url).versions
            for name in state.known:
                if name not in chosen and name in old and state.wants(name):
                    chosen[name] = (old[name], keep_from.packed(type_url, name))
        return chosen

    mode = ""

    def on_request(self, request: Any) -> list[Any]:
        raise NotImplementedError

    def respond(self, type_url: str, state: TypeState, keep_from: Snapshot | None, force: bool = False) -> Any:
        raise NotImplementedError


class SotwStream(_Stream):
    mode = "sotw"

    def on_request(self, request: Any) -> list[Any]:
        type_url = request.type_url
        names = set(request.resource_names)
        wildcard = type_url not in NAMED_TYPES and (not names or "*" in names)
        state = self.types.get(type_url)
        if request.response_nonce:
            if state is None or request.response_nonce != state.nonce:
                return []  # stale: a newer response is on its way
            responses = self.handle_ack(request, state, request.version_info)
            if (state.wildcard, state.names) == (wildcard, names) or request.HasField("error_detail"):
                return responses
            state.wildcard, state.names = wildcard, names
            return responses + self._maybe(type_url, state)
        # A fresh subscription (first request, or Envoy re-requesting): always answer.
        self.types[type_url] = state = TypeState(wildcard, names)
        return self._maybe(type_url, state)

    def _maybe(self, type_url: str, state: TypeState) -> list[Any]:
        if self.snapshot is None:
            self.snapshot = self.cache.get(self.group)
        if self.snapshot is None:
            return []  # answered when the first snapshot is set
        response = self.respond(type_url, state, None, force=True)
        return [response] if response is not None else []

    def respond(self, type_url: str, state: TypeState, keep_from: Snapshot | None, force: bool = False) -> Any:
        chosen = self.selection(type_url, state, keep_from)
        versions = {name: version for name, (version, _) in chosen.items()}
        if not force and state.answered and versions == state.known:
            return None
        assert self.snapshot is not None
        state.known, state.nonce, state.version = versions, self.next_nonce(), self.snapshot.version
        state.answered = True
        log.debug(
            "push node=%s type=%s version=%s n=%d",
            self.node_id,
            short(type_url),
            state.version,
            len(chosen),
        )
        return discovery_pb2.DiscoveryResponse(
            version_info=state.version,
            type_url=type_url,
            nonce=state.nonce,
            resources=[packed for _, packed in chosen.values()],
        )


class DeltaStream(_Stream):
    mode = "delta"

    def on_request(self, request: Any) -> list[Any]:
        type_url = request.type_url
        state = self.types.get(type_url)
        responses: list[Any] = []
        if state is None:
            subscribe = set(request.resource_names_subscribe)
            wildcard = type_url not in NAMED_TYPES and (not subscribe or "*" in subscribe)
            state = TypeState(wildcard, subscribe - {"*"}, dict(request.initial_resource_versions))
            self.types[type_url] = state
            fresh = True
        else:
            fresh = False
            if request.response_nonce:
                if request.response_nonce != state.nonce:
                    return []
                responses = self.handle_ack(request, state, state.version)
            state.names |= set(request.resource_names_subscribe) - {"*"}
            if "*" in request.resource_names_subscribe:
                state.wildcard = True
            for name in request.resource_names_unsubscribe:
                if name == "*":
                    state.wildcard = False
                state.names.discard(name)
                if state.known is not None and not state.wants(name):
                    state.known.pop(name, None)
        if self.snapshot is None:
            self.snapshot = self.cache.get(self.group)
        if self.snapshot is None:
            return responses
        response = self.respond(type_url, state, None, force=fresh)
        return responses + ([response] if response is not None else [])

    def respond(self, type_url: str, state: TypeState, keep_from: Snapshot | None, force: bool = False) -> Any:
        chosen = self.selection(type_url, state, keep_from)
        known = state.known or {}
        changed = {n: vp for n, vp in chosen.items() if known.get(n) != vp[0]}
        removed = sorted(n for n in known if n not in chosen)
        if not changed and not removed and not (force or not state.answered):
            return None
        assert self.snapshot is not None
        state.known = {name: version for name, (version, _) in chosen.items()}
        state.nonce, state.version = self.next_nonce(), self.snapshot.version
        state.answered = True
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=state.version,
            type_url=type_url,
            nonce=state.nonce,
            removed_resources=removed,
            resources=[
                discovery_pb2.Resource(name=name, version=version, resource=packed)
                for name, (version, packed) in sorted(changed.items())
            ],
        )


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, cache: SnapshotCache, acks: AckBook) -> None:
        self.cache = cache
        self.acks = acks
        self._nonces = itertools.count(1)

    async def StreamAggregatedResources(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for response in SotwStream(self.cache, self.acks, self._nonces).run(request_iterator):
            yield response

    async def DeltaAggregatedResources(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for response in DeltaStream(self.cache, self.acks, self._nonces).run(request_iterator):
            yield response
