"""The ACK book: what each Envoy has acknowledged or rejected, per resource type."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Protocol

from contract.payload import flat
from controlplane.xds.snapshot import short

log = logging.getLogger("mllambda.xds")
NACK_KEPT = 1_000  # characters of an Envoy's NACK text kept (what describe, status and the dashboard show)
FORGET_AFTER = 600.0  # seconds after its last stream closed that a node's state is dropped


@dataclass(frozen=True)
class TypeAck:
    node_id: str
    group: str
    type_url: str
    acked_version: str = ""
    nack_version: str = ""
    nack_error: str = ""
    nacks: int = 0
    acks: int = 0
    updated_at: float = 0.0


class AckListener(Protocol):
    """What the rest of the control plane hears from the ADS streams, as go-control-plane's `Callbacks`:
    `joined` when an Envoy's first request names its node (its extensions are known from then),
    `acked` on every ACK. Both run on the event loop, inside the stream: keep them short, never block."""

    def joined(self, node_id: str) -> None: ...

    def acked(self, node_id: str, group: str, type_url: str, version: str) -> None: ...


class AckBook:
    """ACK/NACK per (node id, type url); a NACK stays visible until a later ACK."""

    def __init__(self, forget_after: float = FORGET_AFTER) -> None:
        self.forget_after = forget_after
        # node id -> when its last stream closed, oldest first (a node is taken out when it connects again)
        self._gone_since: dict[str, float] = {}
        self._by_key: dict[tuple[str, str], TypeAck] = {}
        self._types_of: dict[str, set[str]] = {}  # node id -> the type urls it has in _by_key
        self._connected: dict[str, int] = {}
        self._listeners: list[AckListener] = []
        self.extensions: dict[str, frozenset[str]] = {}  # node id -> extension names its Envoy reports
        self._modes: dict[str, int] = {"sotw": 0, "delta": 0}

    def _current(self, node_id: str, group: str, type_url: str) -> TypeAck:
        found = self._by_key.get((node_id, type_url))
        if found is None:
            self._types_of.setdefault(node_id, set()).add(type_url)
            return TypeAck(node_id, group, type_url)
        return found

    def listen(self, listener: AckListener) -> None:
        self._listeners.append(listener)

    def ack(self, node_id: str, group: str, type_url: str, version: str) -> None:
        for listener in self._listeners:
            listener.acked(node_id, group, type_url, version)
        status = self._current(node_id, group, type_url)
        self._by_key[(node_id, type_url)] = replace(
            status,
            acked_version=version,
            nack_version="",
            nack_error="",
            acks=status.acks + 1,
            updated_at=time.time(),
        )

    def nack(self, node_id: str, group: str, type_url: str, version: str, error: str) -> None:
        error = flat(error, NACK_KEPT)
        status = self._current(node_id, group, type_url)
        self._by_key[(node_id, type_url)] = replace(
            status,
            nack_version=version,
            nack_error=error,
            nacks=status.nacks + 1,
            updated_at=time.time(),
        )
        log.warning(
            "NACK node=%s type=%s version=%s error=%s", flat(node_id, 200), short(type_url), version[:40], error
        )

    def connected(self, node_id: str, delta: int, mode: str = "sotw") -> None:
        self._modes[mode] = self._modes.get(mode, 0) + delta
        count = self._connected.get(node_id, 0) + delta
        if count > 0:
            self._connected[node_id] = count
            self._gone_since.pop(node_id, None)
        else:
            self._connected.pop(node_id, None)
            self._gone_since[node_id] = time.monotonic()
        self.forget_gone()

    def forget_gone(self) -> None:
        """Drop everything about nodes whose last stream closed more than `forget_after` seconds ago. The
        oldest leave first: the work is what is forgotten, not every node gone (10,000 Envoys leaving at
        once made each close scan all the others: bench.xds_scale)."""
        cutoff = time.monotonic() - self.forget_after
        while self._gone_since:
            node_id, since = next(iter(self._gone_since.items()))
            if since >= cutoff:
                return
            del self._gone_since[node_id]
            self.extensions.pop(node_id, None)
            for type_url in self._types_of.pop(node_id, ()):
                self._by_key.pop((node_id, type_url), None)

    def joined(self, node_id: str, extensions: frozenset[str]) -> None:
        self.extensions[node_id] = extensions
        for listener in self._listeners:
            listener.joined(node_id)

    def streams_by_mode(self) -> dict[str, int]:
        return dict(self._modes)

    def gone_since(self, node_id: str) -> float | None:
        """When (monotonic) the node's last stream here closed; None if it streams or never did (or long ago)."""
        return self._gone_since.get(node_id)

    def is_connected(self, node_id: str) -> bool:
        return node_id in self._connected

    def all(self) -> list[TypeAck]:
        self.forget_gone()
        return sorted(self._by_key.values(), key=lambda s: (s.node_id, s.type_url))

    def for_node(self, node_id: str) -> list[TypeAck]:
        return [s for s in self.all() if s.node_id == node_id]

    def nacks(self) -> list[TypeAck]:
        return [s for s in self.all() if s.nack_error]
