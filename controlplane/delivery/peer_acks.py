"""What the other control planes' sidecars have, so a version takes traffic only once every sidecar has it.

Each Envoy streams to one control plane, and a control plane sees the ACKs of
its own streams only. With several of them, "every sidecar that routes a
version has acknowledged it" (switch.py) must count the sidecars of the others
too: otherwise a gateway on one control plane moves to a version that a sidecar
streaming to another (or to one cut off from the rest) does not route yet, and
that sidecar's ingress refuses the requests (403).

So each control plane keeps one KV record, `<prefix>-controlplanes/<id>`, held
by a Consul session (TTL, behaviour "delete": the record goes when its control
plane stops, dies, or is cut off from the Consul servers): the node groups
streaming to it, and the pipeline versions every one of them that routes it has
acknowledged. It reads the others' records with one blocking query.

A node group that must route a pending version and does not stream here is:
- in a live record: waited for until that record lists the version;
- in no record, but seen streaming (here or in a record) within HOLD seconds:
  waited for, as it is most likely reconnecting (its control plane cut off or
  restarted, its HTTP/2 pings about to give up on the old stream);
- otherwise not waited for: an Envoy that never connected, or has been away
  longer, does not hold every pipeline change (that is what it did before).

A record that does not parse is skipped and reported; the others still count.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import consul.aio

from contract.watch import watch
from controlplane.consul.lock import RENEW_EVERY, Session

log = logging.getLogger("mllambda.peers")
Pair = tuple[str, int]
HOLD = 20.0  # seconds a node group seen streaming is waited for after it streams to no control plane
WRITE_SPACING = 0.05  # seconds between two writes of the record: a burst of ACKs is written once
MAX_RECORD = 400_000  # bytes of one record (Consul refuses values over 512 KiB)
MAX_NAME = 256  # characters of a node group or pipeline name in a record
MAX_PEERS = 64  # records read; more are skipped and reported
MAX_REMEMBERED = 100_000  # node groups remembered as "seen lately"


def records_prefix(kv_prefix: str) -> str:
    return kv_prefix.rstrip("/") + "-controlplanes/"


@dataclass(frozen=True)
class PeerRecord:
    holder: str
    groups: frozenset[str]  # node groups streaming to that control plane
    ready: frozenset[Pair]  # versions every one of them that routes it has acknowledged


def encode(record: PeerRecord) -> bytes:
    """The record as JSON; groups beyond MAX_RECORD are left out (peers then do not wait for them) and logged."""
    ready = [[name, version] for name, version in sorted(record.ready)]
    groups = sorted(record.groups)
    while True:
        raw = json.dumps({"holder": record.holder, "groups": groups, "ready": ready}).encode()
        if len(raw) <= MAX_RECORD or not groups:
            return raw
        log.warning("record over %d bytes: %d node groups left out of it", MAX_RECORD, len(groups) // 2)
        groups = groups[: len(groups) // 2]


def decode(raw: bytes | None) -> PeerRecord:
    """A record as another control plane wrote it; ValueError says what is wrong with one that is not."""
    if raw is None or len(raw) > MAX_RECORD:
        raise ValueError(f"empty or over {MAX_RECORD} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError("not an object")
    holder, groups, ready = data.get("holder"), data.get("groups"), data.get("ready")
    if not isinstance(holder, str) or not isinstance(groups, list) or not isinstance(ready, list):
        raise ValueError("needs holder (text), groups and ready (lists)")
    if not all(isinstance(g, str) and 0 < len(g) <= MAX_NAME for g in groups):
        raise ValueError(f"a node group that is not a name of 1-{MAX_NAME} characters")
    pairs = set()
    for pair in ready:
        ok = isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and 0 < len(pair[0]) <= MAX_NAME
        if not ok or type(pair[1]) is not int or pair[1] < 1:
            raise ValueError(f"ready holds {str(pair)[:80]!r}, not [pipeline, version]")
        pairs.add((pair[0], pair[1]))
    return PeerRecord(holder[:MAX_NAME], frozenset(groups), frozenset(pairs))


def wait_reason(
    group: str, pair: Pair, records: Mapping[str, PeerRecord], last_seen: float | None, now: float
) -> str | None:
    """Why a pending version waits for a node group that does not stream here (None: it does not)."""
    holding = [r for r in records.values() if group in r.groups]
    waiting = [r.holder for r in holding if pair not in r.ready]
    if waiting:
        return f"streams to control plane {waiting[0]}, not acknowledged there yet"
    if holding:
        return None
    if last_seen is not None and now - last_seen < HOLD:
        return f"streams to no control plane for {now - last_seen:.1f}s; waiting up to {HOLD:g}s for it to reconnect"
    return None


def own_id() -> str:
    """This control plane's record name: host, pid and a random part, in characters a KV key takes as they are."""
    raw = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", raw)[:120]


class SharedAcks:
    """This control plane's record, kept written, and the others', kept read."""

    def __init__(
        self,
        client: consul.aio.Consul,
        kv_prefix: str,
        local: Callable[[], tuple[frozenset[str], frozenset[Pair]]],
        on_change: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.prefix = records_prefix(kv_prefix)
        self.id = own_id()
        self.key = self.prefix + self.id
        self.local = local  # (node groups streaming here, versions all of them have) as of now
        self.on_change = on_change  # a pending version may be ready (or not) now
        self.clock = clock
        self.records: dict[str, PeerRecord] = {}  # record id -> the others' records
        self.broken: dict[str, str] = {}  # record id -> why it was skipped
        self.read_once = False
        self.last_seen: dict[str, float] = {}  # node group -> when it last left a record
        self._dirty = asyncio.Event()
        self.session = Session(client, "mllambda-controlplane-record", "delete")
        self._written: bytes | None = None
        self._failing = False

    def changed(self) -> None:
        """Something this control plane's record is made of may have changed (an ACK, a stream, a reconcile)."""
        self._dirty.set()

    def reason(self, group: str, pair: Pair, gone_here: float | None) -> str | None:
        if not self.read_once:
            return "the other control planes' records (not read yet)"
        seen = max((t for t in (gone_here, self.last_seen.get(group)) if t is not None), default=None)
        return wait_reason(group, pair, self.records, seen, self.clock())

    def report(self) -> dict[str, Any]:
        """What /api/status shows: this record's id, the others' (sidecar count, versions ready), skipped ones."""
        others = {
            name: {"holder": r.holder, "sidecars": len(r.groups), "ready": [list(p) for p in sorted(r.ready)]}
            for name, r in sorted(self.records.items())
        }
        return {"this": self.id, "others": others, "skipped": dict(self.broken)}

    async def run(self) -> None:
        await asyncio.gather(self._write_forever(), watch(self._query, self._take, what="control plane records"))

    async def _write_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), timeout=RENEW_EVERY / 2)  # the session's renewals
            except TimeoutError:
                pass
            self._dirty.clear()
            try:
                await self._write()
                if self._failing:
                    log.info("this control plane's record is written again")
                self._failing = False
            except asyncio.CancelledError:
                raise
            except Exception as err:  # Consul away: the next round writes it (logged once, not every round)
                if not self._failing:
                    log.warning("writing this control plane's record failed: %s; trying again", err)
                self._failing, self._written = True, None
                self.session.forget()
            await asyncio.sleep(WRITE_SPACING)

    async def _write(self) -> None:
        session = await self.session.current()
        if session is None:  # it expired, and the record with it
            log.warning("record session expired (Consul away or this process stalled); writing it again")
            self._written = None
            session = await self.session.current()
        groups, ready = self.local()
        raw = encode(PeerRecord(self.id, groups, ready))
        if raw != self._written:
            if not await self.client.kv.put(self.key, raw, acquire=session):
                raise RuntimeError(f"Consul refused {self.key}")
            self._written = raw

    async def _query(self, index: int | None) -> tuple[Any, list[dict[str, Any]]]:
        returned, items = await self.client.kv.get(self.prefix, recurse=True, index=index, wait="30s")
        return returned, items or []

    def _take(self, items: list[dict[str, Any]]) -> None:
        records: dict[str, PeerRecord] = {}
        broken: dict[str, str] = {}
        for item in items:
            name = str(item.get("Key", ""))[len(self.prefix) :]
            if name == self.id:
                continue
            if len(records) >= MAX_PEERS:
                broken[name[:MAX_NAME]] = f"more than {MAX_PEERS} control planes' records"
                continue
            try:
                records[name] = decode(item.get("Value"))
            except ValueError as err:
                broken[name[:MAX_NAME]] = str(err)
        for name, why in broken.items():
            if self.broken.get(name) != why:
                log.warning("control plane record %r skipped: %s", name, why)
        now = self.clock()
        self._note_left(self._groups(self.records.values()) - self._groups(records.values()), now)
        self.records, self.broken, self.read_once = records, broken, True
        self.on_change()

    def _note_left(self, left: Iterable[str], now: float) -> None:
        """Groups no record lists any more: when they left (what `reason` waits on)."""
        for group in left:
            self.last_seen.pop(group, None)
            self.last_seen[group] = now
        while len(self.last_seen) > MAX_REMEMBERED:
            del self.last_seen[next(iter(self.last_seen))]

    @staticmethod
    def _groups(records: Iterable[PeerRecord]) -> set[str]:
        return {g for r in records for g in r.groups}

    async def stop(self) -> None:
        try:
            await self.session.destroy()  # its record goes with it
        except Exception as err:
            log.warning("removing this control plane's record failed (its TTL will): %s", err)
