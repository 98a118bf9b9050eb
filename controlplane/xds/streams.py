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
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from contract.naming import identity_of
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
MAX_PENDING = 64  # requests read ahead per stream; beyond, reading pauses and gRPC flow control holds the client
MAX_TYPES = 16  # resource types one stream may ask for (Envoy asks for at most ~8); more ends the stream
TYPE_URL_CHARS = 200


class Refused(Exception):
    """This stream may not have what it asks for (its certificate names another identity)."""


# (node id, group) -> None (allowed), a reason (refused), or WAIT (unknown yet: checked again on each change).
Guard = Callable[[str, str], "str | None"]
WAIT = "wait"


class Inbox(asyncio.Queue[object]):
    """A stream's events in order; snapshot changes collapse into one pending marker (it reads the latest)."""

    def __init__(self) -> None:
        super().__init__()
        self.change_pending = False

    def put_nowait(self, item: object) -> None:
        if item is SNAPSHOT_CHANGED:
            if self.change_pending:
                return
            self.change_pending = True
        super().put_nowait(item)

    def get_nowait(self) -> object:
        item = super().get_nowait()  # Queue.get() ends here too
        if item is SNAPSHOT_CHANGED:
            self.change_pending = False  # a change after this one must be read again
        return item


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


# What a stream reads and writes: state of the world (SotwStream) or incremental (DeltaStream).
Request: TypeAlias = discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest
Response: TypeAlias = discovery_pb2.DiscoveryResponse | discovery_pb2.DeltaDiscoveryResponse
Context: TypeAlias = grpc.aio.ServicerContext


class _Stream:
    """Shared loop: requests and snapshot changes arrive on one queue, in order."""

    def __init__(self, cache: SnapshotCache, acks: AckBook, nonces: Iterable[int], guard: Guard | None = None) -> None:
        self.cache = cache
        self.acks = acks
        self.guard = guard  # None: plaintext xDS on loopback, every node is who it says
        self.allowed = guard is None
        self._extensions: frozenset[str] = frozenset()
        self._held: list[Request] = []  # requests not answered yet: the node is not known to be who it says
        self._nonces = iter(nonces)
        self.types: dict[str, TypeState] = {}
        self.node_id = ""
        self.group = ""
        self.snapshot: Snapshot | None = None  # last one pushed to this stream
        self._cleanup_nonces: set[str] = set()  # listener/route pushes gating cluster removal

    def next_nonce(self) -> str:
        return str(next(self._nonces))

    def new_type(self, type_url: str, state: TypeState) -> TypeState:
        """Remember what this stream asked for of a type it had not asked for yet (Refused past the bounds)."""
        if len(self.types) >= MAX_TYPES or len(type_url) > TYPE_URL_CHARS:
            raise Refused(f"more than {MAX_TYPES} resource types, or a type url over {TYPE_URL_CHARS} characters")
        self.types[type_url] = state
        return state

    async def run(self, requests: AsyncIterator[Request]) -> AsyncIterator[Response]:
        queue, room = Inbox(), asyncio.Semaphore(MAX_PENDING)
        reader = asyncio.create_task(self._read(requests, queue, room))
        try:
            while (item := await queue.get()) is not _END:
                if item is SNAPSHOT_CHANGED:
                    responses = self._replay() + self._on_snapshot() if self._admitted() else []
                else:
                    room.release()
                    if not self.node_id:
                        self._join(item, queue)
                    elif item.node.id and item.node.id != self.node_id:  # type: ignore[attr-defined]
                        raise Refused(f"a stream of node {self.node_id!r} asked as {item.node.id[:80]!r}")  # type: ignore[attr-defined]
                    self._held.append(item)
                    if len(self._held) > MAX_PENDING:
                        raise Refused(f"{MAX_PENDING} requests before node {self.node_id!r} was known")
                    responses = self._replay() if self._admitted() else []
                for response in responses:
                    yield response
        finally:
            reader.cancel()
            if self.group:
                self.cache.unwatch(self.group, queue)
                if self.allowed:
                    self.acks.connected(self.node_id, -1, self.mode)
                log.info("stream closed node=%s", self.node_id)

    def _admitted(self) -> bool:
        """May this stream be served (and its ACKs and extensions believed)? Raises Refused if never."""
        if not self.allowed and self.guard is not None:
            verdict = self.guard(self.node_id, self.group)
            if verdict == WAIT:
                return False
            if verdict is not None:
                raise Refused(verdict)
            self.allowed = True
            self._announce()
        return self.allowed

    def _replay(self) -> list[Response]:
        held, self._held = self._held, []
        return [response for request in held for response in self.on_request(request)]

    async def _read(
        self, requests: AsyncIterator[Request], queue: asyncio.Queue[object], room: asyncio.Semaphore
    ) -> None:
        try:
            async for request in requests:
                await room.acquire()
                queue.put_nowait(request)
        except Exception as err:  # the client went away; the stream ends either way
            log.debug("stream read ended node=%s: %s", self.node_id, err)
        finally:
            queue.put_nowait(_END)

    def _join(self, request: Request, queue: asyncio.Queue[object]) -> None:
        self.node_id = request.node.id or "unknown"
        self.group = self.cache.group_of(request.node)
        self._extensions = frozenset(e.name for e in request.node.extensions)
        self.cache.watch(self.group, queue)
        if self.allowed:
            self._announce()

    def _announce(self) -> None:
        self.acks.connected(self.node_id, +1, self.mode)
        self.acks.joined(self.node_id, self._extensions)
        log.info("stream opened node=%s group=%s mode=%s", self.node_id, self.group, self.mode)

    def _on_snapshot(self) -> list[Response]:
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

    def _drop_removed_clusters(self) -> list[Response]:
        self._cleanup_nonces = set()
        state = self.types.get(CLUSTER)
        if state is None:
            return []
        response = self.respond(CLUSTER, state, None)
        return [response] if response is not None else []

    def handle_ack(self, request: Request, state: TypeState, version: str) -> list[Response]:
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
        resources, wildcard, names = self.snapshot.of_type(type_url), state.wildcard, state.names
        packed = resources.packed  # looked up once: this runs per stream per type on every push
        chosen = {
            name: (version, packed[name]) for name, version in resources.versions.items() if wildcard or name in names
        }
        if keep_from is not None and state.known:
            old = keep_from.of_type(type_url).versions
            for name in state.known:
                if name not in chosen and name in old and state.wants(name):
                    chosen[name] = (old[name], keep_from.packed(type_url, name))
        return chosen

    mode = ""

    def on_request(self, request: Request) -> list[Response]:
        raise NotImplementedError

    def respond(
        self, type_url: str, state: TypeState, keep_from: Snapshot | None, force: bool = False
    ) -> Response | None:
        raise NotImplementedError


class SotwStream(_Stream):
    mode = "sotw"

    def on_request(self, request: discovery_pb2.DiscoveryRequest) -> list[Response]:
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
        state = self.new_type(type_url, TypeState(wildcard, names))
        return self._maybe(type_url, state)

    def _maybe(self, type_url: str, state: TypeState) -> list[Any]:
        if self.snapshot is None:
            self.snapshot = self.cache.get(self.group)
        if self.snapshot is None:
            return []  # answered when the first snapshot is set
        response = self.respond(type_url, state, None, force=True)
        return [response] if response is not None else []

    def respond(
        self, type_url: str, state: TypeState, keep_from: Snapshot | None, force: bool = False
    ) -> Response | None:
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

    def on_request(self, request: discovery_pb2.DeltaDiscoveryRequest) -> list[Response]:
        type_url = request.type_url
        state = self.types.get(type_url)
        responses: list[Response] = []
        if state is None:
            subscribe = set(request.resource_names_subscribe)
            wildcard = type_url not in NAMED_TYPES and (not subscribe or "*" in subscribe)
            state = self.new_type(
                type_url, TypeState(wildcard, subscribe - {"*"}, dict(request.initial_resource_versions))
            )
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

    def respond(
        self, type_url: str, state: TypeState, keep_from: Snapshot | None, force: bool = False
    ) -> Response | None:
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


Authorize = Callable[[str, str, str], "str | None"]  # (identity, node id, group) -> None, WAIT or why not


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """`authorize` given: every stream must come with a client certificate, and gets only its own node's config."""

    def __init__(self, cache: SnapshotCache, acks: AckBook, authorize: Authorize | None = None) -> None:
        self.cache = cache
        self.acks = acks
        self.authorize = authorize
        self._nonces = itertools.count(1)

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: Context
    ) -> AsyncIterator[Response]:
        async for response in self._serve(SotwStream, request_iterator, context):
            yield response

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest], context: Context
    ) -> AsyncIterator[Response]:
        async for response in self._serve(DeltaStream, request_iterator, context):
            yield response

    async def _serve(
        self, kind: type[_Stream], requests: AsyncIterator[Request], context: Context
    ) -> AsyncIterator[Response]:
        guard, identity = None, None
        if self.authorize is not None:
            identity = peer_identity(context)
            if identity is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate from our CA is required")
            authorize, who = self.authorize, identity or ""
            guard = lambda node, group: authorize(who, node, group)  # noqa: E731
        try:
            async for response in kind(self.cache, self.acks, self._nonces, guard).run(requests):
                yield response
        except Refused as err:
            log.warning("xds stream refused identity=%s: %s", identity, err)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err)[:300])


def peer_identity(context: Context) -> str | None:
    """The Consul service named by the peer certificate's SPIFFE URI (gRPC lists URI SANs with the others)."""
    for san in context.auth_context().get("x509_subject_alternative_name", []):
        found = identity_of(san.decode(errors="replace"))
        if found:
            return found
    return None
