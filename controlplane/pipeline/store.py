"""Pipeline versions in Consul KV: immutable, numbered, written with check-and-set.

Layout under the prefix (default `mllambda/pipelines/`):
  <name>/head        {"version": N, "deleted": false}   -- which version is current
  <name>/v/00000042  {"version": 42, "spec": {...}, "created_at": ..., "cause": ...}

A new version and its head move are one Consul transaction: the head is
check-and-set against the index it was read at and the version key must not
exist yet, so two writers can never lose or duplicate an update; the loser
re-reads and tries again. The control plane keeps no state of its own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
import consul
import consul.aio

from contract.naming import DEFAULT_KV_PREFIX
from controlplane.pipeline.model import Pipeline, PipelineVersion
from controlplane.pipeline.spec import parse_pipeline, pipeline_to_dict

MAX_ATTEMPTS = 32
MAX_BROKEN_SHOWN = 100  # broken pipelines reported at once
HISTORY_PAGE, HISTORY_MAX = 50, 500  # versions per History page: default, most
KEEP_VERSIONS = 1000  # per pipeline: rollout steps write versions, so history must not grow without end


class StoreError(Exception):
    """Base for store failures; each subclass maps to one gRPC status."""


class PipelineNotFound(StoreError):
    pass


class WriteConflict(StoreError):
    """Too many concurrent writers on one pipeline; nothing was written."""


class NotCurrent(StoreError):
    """The caller's view is stale: the version it meant to replace is no longer current."""


class StoreUnavailable(StoreError):
    """Consul could not be reached; nothing was written."""


class BrokenRecord(StoreError):
    """A record under the prefix that is not what this store writes (hand-edited, or from another tool)."""


REASON_SHOWN = 200  # characters of a broken record's reason kept and shown


def _decode(item: dict[str, Any]) -> Any:
    try:
        return json.loads(item["Value"] or b"")
    except ValueError as err:
        raise BrokenRecord(f"{item['Key']}: not JSON ({err})"[:REASON_SHOWN]) from err


def _version_of(item: dict[str, Any]) -> PipelineVersion:
    record = _decode(item)
    try:
        return version_from_record(record)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise BrokenRecord(
            f"{item['Key']}: not a pipeline version ({type(err).__name__}: {err})"[:REASON_SHOWN]
        ) from err


@dataclass(frozen=True)
class StoreView:
    """Everything under the prefix at one Consul index."""

    index: int
    current: dict[str, PipelineVersion]  # name -> current version (deleted ones included)
    history: dict[str, list[PipelineVersion]]
    broken: dict[str, str] = field(default_factory=dict)  # name -> why a record of it was skipped

    def live(self) -> list[PipelineVersion]:
        return [v for _, v in sorted(self.current.items()) if not v.deleted]


class EmptyHold:
    """Nothing at all under the prefix, after a read that had pipelines, is suspect: no admin call does that (a
    deleted pipeline keeps its head and history), a Consul agent restarted empty (a dev agent) or a wiped KV does.
    Such a view is held, and what is served kept, for `grace` seconds; a view with anything in it ends the hold."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.since: float | None = None  # when the held empty view was first read (time.time())

    def held(self, view: StoreView, had_pipelines: bool, now: float) -> bool:
        """True: keep serving what was read before; False: take `view`."""
        if view.current or view.history or view.broken or not had_pipelines or self.grace <= 0:
            self.since = None
            return False
        if self.since is None:
            self.since = now
        return now - self.since < self.grace


class PipelineStore:
    def __init__(self, client: consul.aio.Consul, prefix: str = DEFAULT_KV_PREFIX, keep: int = KEEP_VERSIONS) -> None:
        self.client = client
        self.prefix = prefix
        self.keep = keep  # versions per pipeline: writing version N drops version N - keep, in the same transaction
        self._parsed: dict[str, tuple[int, PipelineVersion]] = {}  # version key -> (ModifyIndex, parsed)

    def _head_key(self, name: str) -> str:
        return f"{self.prefix}{name}/head"

    def _version_key(self, name: str, version: int) -> str:
        return f"{self.prefix}{name}/v/{version:08d}"

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            raise StoreUnavailable(f"Consul unreachable: {err}") from err
        except consul.ConsulException as err:
            if str(err).startswith("5"):
                raise StoreUnavailable(f"Consul error: {err}") from err
            raise

    async def _read_head(self, name: str) -> tuple[int, dict[str, Any] | None]:
        _, item = await self._call(self.client.kv.get(self._head_key(name)))
        if item is None:
            return 0, None
        head = _decode(item)
        if not isinstance(head, dict) or not isinstance(head.get("version"), int):
            raise BrokenRecord(f"{item['Key']}: not a pipeline head"[:REASON_SHOWN])
        return int(item["ModifyIndex"]), head

    async def _read_version(self, name: str, version: int, deleted: bool = False) -> PipelineVersion:
        _, item = await self._call(self.client.kv.get(self._version_key(name, version)))
        if item is None:
            raise PipelineNotFound(f"pipeline {name!r} has no version {version}")
        return replace(_version_of(item), deleted=deleted)

    async def apply(self, pipeline: Pipeline, cause: str = "apply", expect: int = 0) -> tuple[PipelineVersion, bool]:
        """Make `pipeline` current. Returns (version, created); the same spec twice is a no-op.

        With `expect`, only if version `expect` is current (else NotCurrent): a
        read-judge-write (a rollout step, an edit) never overwrites a change it did not see.
        """
        for attempt in range(MAX_ATTEMPTS):
            index, head, same = await self._judged(pipeline, expect)
            if same is not None:
                return same, False
            number = head["version"] + 1 if head else 1
            created = PipelineVersion(pipeline, number, _now(), cause)
            if await self._commit(pipeline.name, index, {"version": number, "deleted": False}, created):
                return created, True
            await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))
        raise WriteConflict(f"pipeline {pipeline.name!r}: too many concurrent writers, try again")

    async def would_create(self, pipeline: Pipeline, expect: int = 0) -> bool:
        """What `apply` would do, writing nothing (a dry run): make a new version? NotCurrent as `apply` raises it."""
        _, _, same = await self._judged(pipeline, expect)
        return same is None

    async def _judged(
        self, pipeline: Pipeline, expect: int
    ) -> tuple[int, dict[str, Any] | None, PipelineVersion | None]:
        """The head read (its index, itself) after the `expect` check; the current version if it is `pipeline`."""
        index, head = await self._read_head(pipeline.name)
        if expect and (head is None or head["deleted"] or head["version"] != expect):
            now = "deleted" if head and head["deleted"] else f"at version {head['version']}" if head else "absent"
            raise NotCurrent(f"pipeline {pipeline.name!r} is {now}, not at version {expect}")
        if head is not None and not head["deleted"]:
            current = await self._read_version(pipeline.name, head["version"])
            if current.pipeline == pipeline:
                return index, head, current
        return index, head, None

    async def _commit(self, name: str, head_index: int, head: dict[str, Any], new: PipelineVersion | None) -> bool:
        ops = [_cas(self._head_key(name), head, head_index)]
        if new is not None:
            ops.append(_cas(self._version_key(name, new.version), version_to_record(new), 0))
            if new.version > self.keep:
                ops.append({"KV": {"Verb": "delete", "Key": self._version_key(name, new.version - self.keep)}})
        try:
            await self._call(self.client.txn.put(ops))
        except consul.ConsulException as err:
            if str(err).startswith("409"):
                return False  # someone else moved the head first
            raise
        return True

    async def get(self, name: str) -> PipelineVersion:
        _, head = await self._read_head(name)
        if head is None or head["deleted"]:
            raise PipelineNotFound(f"pipeline {name!r} not found")
        return await self._read_version(name, head["version"])

    async def history(self, name: str, limit: int = HISTORY_PAGE, before: int = 0) -> tuple[list[PipelineVersion], int]:
        """The newest `limit` versions below `before` (0: all), oldest first, and where the next page starts.

        Reads the version keys, then only the page's records (one transaction per 64).
        """
        limit = max(1, min(limit or HISTORY_PAGE, HISTORY_MAX))
        _, keys = await self._call(self.client.kv.get(f"{self.prefix}{name}/v/", keys=True))
        numbers = sorted(n for k in keys or [] if (n := _number(k)) is not None and (not before or n < before))
        if not numbers:
            _, head = await self._read_head(name)
            if head is None:
                raise PipelineNotFound(f"pipeline {name!r} not found")
            return [], 0
        page = numbers[-limit:]
        versions = []
        for start in range(0, len(page), 64):
            ops = [{"KV": {"Verb": "get", "Key": self._version_key(name, n)}} for n in page[start : start + 64]]
            answer = await self._call(self.client.txn.put(ops))
            for result in answer.get("Results") or []:
                item = dict(result["KV"])
                item["Value"] = base64.b64decode(item["Value"]) if item.get("Value") else b""
                versions.append(_version_of(item))
        return versions, (page[0] if len(numbers) > limit else 0)

    async def rollback(self, name: str, to_version: int, cause: str = "") -> tuple[PipelineVersion, bool]:
        target = await self._read_version(name, to_version)
        return await self.apply(target.pipeline, cause=cause or f"rollback to {to_version}")

    async def delete(self, name: str) -> PipelineVersion:
        """Stop serving `name`; its history stays (`history`, `rollback` still work)."""
        for _ in range(MAX_ATTEMPTS):
            index, head = await self._read_head(name)
            if head is None or head["deleted"]:
                raise PipelineNotFound(f"pipeline {name!r} not found")
            if await self._commit(name, index, {**head, "deleted": True}, None):
                return await self._read_version(name, head["version"], deleted=True)
        raise WriteConflict(f"pipeline {name!r}: too many concurrent writers, try again")

    async def view(self, index: int | None = None, wait: str = "30s") -> StoreView:
        """All pipelines; with `index`, a blocking query that returns after a change.

        A first read (no index) is a consistent one: a Consul server just restarted answers default reads from
        what it has applied so far, which may be nothing yet (its log is replayed after it leads); a consistent
        read waits until it has (Consul's "ready for consistent reads"), so a control plane starting beside it
        never takes an empty store for the truth (a CI run saw 854 requests of 20,000 get 404 that way)."""
        consistency = "consistent" if index is None else None
        new_index, items = await self._call(
            self.client.kv.get(
                self.prefix, recurse=True, index=index, wait=wait if index else None, consistency=consistency
            )
        )
        heads: dict[str, dict[str, Any]] = {}
        records: dict[str, dict[int, PipelineVersion]] = {}
        broken: dict[str, str] = {}
        parsed, self._parsed = self._parsed, {}  # versions are immutable: parse each record once
        for item in items or []:
            name, _, tail = item["Key"][len(self.prefix) :].partition("/")
            try:
                if tail == "head":
                    heads[name] = _decode(item)
                    if not isinstance(heads[name].get("version"), int):
                        raise BrokenRecord(f"{item['Key']}: not a pipeline head"[:REASON_SHOWN])
                elif tail.startswith("v/"):
                    known = parsed.get(item["Key"])
                    version = known[1] if known and known[0] == item["ModifyIndex"] else _version_of(item)
                    self._parsed[item["Key"]] = (item["ModifyIndex"], version)
                    records.setdefault(name, {})[version.version] = version
            except (BrokenRecord, AttributeError) as err:  # skipped and reported: it stops no other pipeline
                if tail == "head":
                    heads.pop(name, None)
                if len(broken) < MAX_BROKEN_SHOWN:
                    broken.setdefault(name, str(err)[:REASON_SHOWN])
        current, history = {}, {}
        for name, head in heads.items():
            versions = records.get(name, {})
            history[name] = [versions[n] for n in sorted(versions)]
            if head["version"] in versions:
                current[name] = replace(versions[head["version"]], deleted=bool(head.get("deleted")))
            elif name not in broken:
                broken[name] = f"head names version {head['version']}, which is not stored"
        return StoreView(int(new_index or 0), current, history, broken)


def _number(key: str) -> int | None:
    tail = key.rpartition("/v/")[2]
    return int(tail) if tail.isdigit() else None


def _cas(key: str, value: dict[str, Any], index: int) -> dict[str, Any]:
    blob = base64.b64encode(json.dumps(value, sort_keys=True).encode()).decode()
    return {"KV": {"Verb": "cas", "Key": key, "Value": blob, "Index": index}}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def version_to_record(version: PipelineVersion) -> dict[str, Any]:
    """A pipeline version as stored in Consul KV."""
    return {
        "version": version.version,
        "spec": pipeline_to_dict(version.pipeline),
        "created_at": version.created_at,
        "cause": version.cause,
    }


def version_from_record(record: dict[str, Any], deleted: bool = False) -> PipelineVersion:
    return PipelineVersion(
        parse_pipeline(record["spec"]),
        int(record["version"]),
        str(record["created_at"]),
        str(record["cause"]),
        deleted,
    )
