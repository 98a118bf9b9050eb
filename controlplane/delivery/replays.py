"""Replays: a candidate pipeline version tried on recorded requests beside the live one, never entered by live traffic.

A replay is a *trial*: the candidate's hops are pushed like a pending version's
(numbered from REPLAY_BASE up, beyond any stored version, so paths and ACK
bookkeeping stay apart), and the gateway enters it only for requests that carry
the trial's secret in `x-mll-replay` (translate/pipelines.py). The replaying
client (`mllambda replay`, admin/replay_cli.py) gets the secret from the admin
API, sends the recorded requests at a bounded rate, compares, and ends the
trial with its report. Nothing is written to the pipeline's versions.

In Consul KV beside the pipeline store (`<prefix>-replays/`), so that every
control plane pushes the same trial:
  <pipeline>/active          the trial (at most one per pipeline; it lapses at `expires_at`)
  <pipeline>/reports/<id>    a finished replay's report (the KEEP_REPORTS newest per pipeline)
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import consul
import consul.aio

from controlplane.pipeline.model import Pipeline, PipelineVersion
from controlplane.pipeline.spec import parse_pipeline, pipeline_to_dict

log = logging.getLogger("mllambda.replays")
REPLAY_BASE = 9_000_000_000  # trial versions: 9,000,000,000 + a random number below 10^9 (paths allow 10 digits)
KEEP_REPORTS = 10  # per pipeline
MAX_REPORT_BYTES = 64 * 1024
MAX_TTL, DEFAULT_TTL = 3600.0, 600.0  # seconds a trial may stay (a client that dies leaves it this long at most)


class ReplayError(Exception):
    """Base for replay failures."""


class ReplayBusy(ReplayError):
    """Another replay of the pipeline is running (FAILED_PRECONDITION)."""


class ReplayNotFound(ReplayError):
    """No such replay (NOT_FOUND)."""


class ReplayUnavailable(ReplayError):
    """Consul could not be reached (UNAVAILABLE)."""


class BadReport(ReplayError):
    """A report that is not a JSON object or is too large (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Trial:
    id: str
    secret: str
    version: PipelineVersion
    started_at: float
    expires_at: float

    @property
    def name(self) -> str:
        return self.version.pipeline.name

    def live(self, now: float) -> bool:
        return now < self.expires_at

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "secret": self.secret,
            "number": self.version.version,
            "spec": pipeline_to_dict(self.version.pipeline),
            "started_at": self.started_at,
            "expires_at": self.expires_at,
        }


def trial_from(record: dict[str, Any]) -> Trial:
    number = int(record["number"])
    if not REPLAY_BASE <= number < REPLAY_BASE + 10**9:
        raise ValueError(f"trial number {number} out of range")
    started, rid = float(record["started_at"]), str(record["id"])
    version = _trial_version(parse_pipeline(record["spec"]), number, started, rid)
    return Trial(rid, str(record["secret"]), version, started, float(record["expires_at"]))


def _trial_version(candidate: Pipeline, number: int, started: float, rid: str) -> PipelineVersion:
    return PipelineVersion(candidate, number, datetime.fromtimestamp(started, UTC).isoformat(), f"replay {rid}")


def new_trial(candidate: Pipeline, ttl: float, now: float) -> Trial:
    rid = datetime.fromtimestamp(now, UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    version = _trial_version(candidate, REPLAY_BASE + secrets.randbelow(10**9), now, rid)
    return Trial(rid, secrets.token_hex(16), version, now, now + min(max(ttl, 10.0), MAX_TTL))


@dataclass(frozen=True)
class ReplayView:
    """Everything under the replays prefix at one Consul index."""

    index: int
    trials: dict[str, Trial] = field(default_factory=dict)  # pipeline -> its trial (expired ones included)
    reports: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # pipeline -> reports, newest first
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why it was not read


def replays_prefix(kv_prefix: str) -> str:
    return kv_prefix.rstrip("/") + "-replays/"


class ReplayBook:
    def __init__(self, client: consul.aio.Consul, kv_prefix: str, clock: Any = time.time) -> None:
        self.client = client
        self.prefix = replays_prefix(kv_prefix)
        self.clock = clock

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (aiohttp.ClientError, OSError, TimeoutError, consul.ConsulException) as err:
            raise ReplayUnavailable(f"Consul: {err}") from err

    async def _active(self, name: str) -> tuple[dict[str, Any] | None, Trial | None]:
        """The pipeline's active record as read (for check-and-set) and its trial (None: none, or broken)."""
        _, item = await self._call(self.client.kv.get(f"{self.prefix}{name}/active"))
        try:
            return item, trial_from(json.loads(item["Value"] or b"")) if item is not None else None
        except (ValueError, KeyError, TypeError):
            return item, None  # a broken record: a new trial replaces it

    async def start(self, candidate: Pipeline, ttl: float = DEFAULT_TTL) -> Trial:
        """A new trial of `candidate`, unless another one of the pipeline is running (ReplayBusy)."""
        item, running = await self._active(candidate.name)
        now = self.clock()
        if running is not None and running.live(now):
            raise ReplayBusy(
                f"replay {running.id} of pipeline {candidate.name!r} is running (it lapses in"
                f" {running.expires_at - now:.0f}s unless ended: `mllambda replay {candidate.name} --end {running.id}`)"
            )
        trial = new_trial(candidate, ttl, now)
        cas = int(item["ModifyIndex"]) if item is not None else 0
        key = f"{self.prefix}{candidate.name}/active"
        if not await self._call(self.client.kv.put(key, json.dumps(trial.record()), cas=cas)):
            raise ReplayBusy(f"another replay of pipeline {candidate.name!r} started at the same moment")
        log.info("replay=%s pipeline=%s started (version %d)", trial.id, candidate.name, trial.version.version)
        return trial

    async def get(self, name: str, rid: str) -> Trial:
        _, trial = await self._active(name)
        if trial is None or trial.id != rid:
            raise ReplayNotFound(f"pipeline {name!r} has no running replay {rid!r}")
        return trial

    async def end(self, name: str, rid: str, report: dict[str, Any] | None) -> None:
        """End the trial `rid` (its hops go) and keep its report, if one is given."""
        item, trial = await self._active(name)
        if item is None or trial is None or trial.id != rid:
            raise ReplayNotFound(f"pipeline {name!r} has no running replay {rid!r}")
        if report is not None:
            text = json.dumps({**report, "id": rid, "pipeline": name})
            if len(text) > MAX_REPORT_BYTES:
                raise BadReport(f"a replay report is at most {MAX_REPORT_BYTES} bytes, got {len(text)}")
            await self._call(self.client.kv.put(f"{self.prefix}{name}/reports/{rid}", text))
            await self._prune(name)
        await self._call(self.client.kv.delete(f"{self.prefix}{name}/active", cas=int(item["ModifyIndex"])))
        log.info("replay=%s pipeline=%s ended (report kept: %s)", rid, name, report is not None)

    async def _prune(self, name: str) -> None:
        _, keys = await self._call(self.client.kv.get(f"{self.prefix}{name}/reports/", keys=True))
        for old in sorted(keys or [])[:-KEEP_REPORTS]:  # ids start with their time: sorted is oldest first
            await self._call(self.client.kv.delete(old))

    async def view(self, index: int | None = None) -> ReplayView:
        returned, items = await self._call(self.client.kv.get(self.prefix, recurse=True, index=index, wait="30s"))
        trials: dict[str, Trial] = {}
        reports: dict[str, list[dict[str, Any]]] = {}
        skipped: dict[str, str] = {}
        for item in items or []:
            key = str(item.get("Key", ""))
            parts = key[len(self.prefix) :].split("/")
            try:
                value = json.loads(item.get("Value") or b"")
                if len(parts) == 2 and parts[1] == "active":
                    trials[parts[0]] = trial_from(value)
                elif len(parts) == 3 and parts[1] == "reports" and isinstance(value, dict):
                    reports.setdefault(parts[0], []).append(value)
                else:
                    raise ValueError("not a replay record")
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                skipped[key[:200]] = f"{type(err).__name__}: {err}"[:200]
        for found in reports.values():
            found.sort(key=lambda r: str(r.get("id", "")), reverse=True)
        return ReplayView(int(returned or 0), trials, reports, skipped)
