"""The control plane's side of model monitoring: read the runtimes' profiles, merge them per model version and
window, keep baselines in Consul KV, and compute drift (sketches.py) for /metrics and `mllambda monitor`.

Every POLL_SECONDS the monitor reads each runtime (GET /profiles?after=<the last window read from it>: on
this host at its own port, on other hosts under mTLS through its sidecar's ingress, which admits the control
plane's identity only) and merges the windows per (model version, window id): replicas' windows of the same ten
seconds become one. The last KEEP_WINDOWS windows per version are kept (ten minutes); *current* is the
merge of the last CURRENT_WINDOWS (one minute). A baseline is a window of that history merged and written
to `<prefix>-baselines/<model>.<version>` (at most MAX_BASELINE bytes) with its drift threshold; every
control plane reads them. Bounded: versions are those discovered; a runtime's answer over MAX_ANSWER
bytes, or one that does not parse, is skipped and counted per runtime.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import consul
import consul.aio

from contract.naming import model_cluster
from contract.service import RuntimeService
from controlplane.monitoring.runtimes import poll_forever, read_at_most, runtime_url
from controlplane.monitoring.sketches import MIN_COUNT, Drift, Profile, bins, drift, merged, read_profile, summary

log = logging.getLogger("mllambda.monitor")
POLL_SECONDS = 10.0
KEEP_WINDOWS = 60
CURRENT_WINDOWS = 6
MAX_ANSWER = 8 * 1024 * 1024
MAX_BASELINE = 400 * 1024  # Consul's KV values stop at 512 KiB
DEFAULT_THRESHOLD = 0.2  # PSI
MAX_IDS = 20_000  # answers kept per version for agreement (the newest)
NUMBER_TOLERANCE = 0.01  # numbers within 1% (relative) agree
Version = tuple[str, str]
# (a model version's cluster, the clusters it is compared with, only the fields both answer): whose answers pair
# by request id (Stage.compared)
Relations = Callable[[], Sequence[tuple[str, frozenset[str], bool]]]


class MonitorError(Exception):
    """A baseline that cannot be made or read (the message says why)."""


@dataclass
class Baseline:
    profile: Profile
    threshold: float
    created_at: str
    window_seconds: int  # 0: not a window of traffic (reference data)
    requests: int
    source: str = "traffic"  # or "reference <file>": the package's reference data


@dataclass
class VersionState:
    windows: deque[tuple[int, Profile]] = field(default_factory=lambda: deque(maxlen=KEEP_WINDOWS))
    drift: list[Drift] = field(default_factory=list)
    too_few: list[str] = field(default_factory=list)
    changes: int = 0  # windows added or merged into: a merge made before one is stale
    _merged: tuple[tuple[int, int], Profile] | None = None

    def add(self, wid: int, profile: Profile) -> None:
        self.changes += 1
        for known, p in self.windows:
            if known == wid:  # another replica's ten seconds
                p.merge(profile)
                return
        self.windows.append((wid, profile))
        self.windows = deque(sorted(self.windows, key=lambda w: w[0]), maxlen=KEEP_WINDOWS)

    def since(self, first: int) -> Profile:
        """The windows from `first` on, merged once per change (a scrape of /metrics asks every second)."""
        key = (first, self.changes)
        if self._merged is None or self._merged[0] != key:
            self._merged = (key, merged(p for wid, p in self.windows if wid >= first))
        return self._merged[1]


def baselines_prefix(kv_prefix: str) -> str:
    return kv_prefix.rstrip("/") + "-baselines/"


class Monitor:
    def __init__(
        self,
        client: consul.aio.Consul,
        kv_prefix: str,
        instances: Callable[[], Sequence[RuntimeService]],
        clock: Callable[[], float] = time.time,
        relations: Relations = lambda: (),
    ) -> None:
        self.client = client
        self.prefix = baselines_prefix(kv_prefix)
        self.instances = instances
        self.clock = clock
        self.versions: dict[Version, VersionState] = {}
        self.baselines: dict[Version, Baseline] = {}
        self.broken_baselines: dict[Version, str] = {}
        self.read_after: dict[str, int] = {}  # service id -> last window id read
        self.skipped: dict[str, str] = {}  # service id -> why its last answer was not used
        self.window_seconds = 10
        self.baselines_index: Any = None  # Consul's index of the baselines last parsed
        self.relations = relations
        self.tls: ssl.SSLContext | None = None  # under mTLS: our client certificate, to read runtimes on other hosts
        self.answers: dict[str, OrderedDict[str, dict[str, Any]]] = {}  # cluster -> request id -> answer
        self.agreement: dict[str, list[dict[str, Any]]] = {}  # shadow cluster -> per primary and field
        # over time, for the monitoring page: each judgement's drift (PSI per field) and agreement (per field)
        self.drift_history: dict[Version, deque[tuple[float, dict[str, float]]]] = {}
        self.agreement_history: dict[str, deque[tuple[float, dict[str, float]]]] = {}

    async def run(self) -> None:
        await poll_forever(self.poll, POLL_SECONDS, "a monitoring poll")

    async def poll(self, session: aiohttp.ClientSession) -> None:
        readable = {i.service_id: (i, url) for i in self.instances() if (url := runtime_url(i, self.tls is not None))}
        await asyncio.gather(*(self._read(session, i, url) for i, url in readable.values()))
        known = {(i.model, i.version) for i in self.instances()}
        for gone in set(self.versions) - known:
            if not self.versions[gone].windows or self.versions[gone].windows[-1][0] < self._window() - KEEP_WINDOWS:
                del self.versions[gone]  # no replica for longer than the history: forgotten
                self.answers.pop(model_cluster(*gone), None)
        running = set(readable)
        for table in (self.read_after, self.skipped):  # runtimes that are gone: nothing more to read from them
            for service_id in set(table) - running:
                del table[service_id]
        await self._read_baselines()
        self._judge()

    def _window(self) -> int:
        return int(self.clock() // self.window_seconds)

    async def _read(self, session: aiohttp.ClientSession, i: RuntimeService, url: str) -> None:
        after = self.read_after.get(i.service_id, 0)
        context: ssl.SSLContext | bool = self.tls if self.tls is not None and url.startswith("https:") else True
        try:
            async with session.get(f"{url}?after={after}", ssl=context) as resp:
                if resp.status == 404:
                    return  # profiling off there
                raw = await read_at_most(resp, MAX_ANSWER)
            answer = json.loads(raw)
            self.window_seconds = int(answer.get("window_seconds", self.window_seconds))
            state = self.versions.setdefault((i.model, i.version), VersionState())
            kept = self.answers.setdefault(model_cluster(i.model, i.version), OrderedDict())
            for window in answer.get("windows") or []:
                state.add(int(window["id"]), read_profile(window))
                answers = window.get("answers") or {}
                if not isinstance(answers, dict):
                    raise ValueError("answers: not a mapping")
                for rid, given in answers.items():
                    if isinstance(given, dict):
                        kept[str(rid)[:64]] = given
                while len(kept) > MAX_IDS:
                    kept.popitem(last=False)
                self.read_after[i.service_id] = max(self.read_after.get(i.service_id, 0), int(window["id"]))
            self.skipped.pop(i.service_id, None)
        except (aiohttp.ClientError, TimeoutError, OSError):
            return  # a runtime that is going or gone: its replicas and the next poll have the rest
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            self.skipped[i.service_id] = f"{type(err).__name__}: {err}"[:200]

    def agreement_of(self, shadow: str, primaries: frozenset[str], field_name: str) -> tuple[int, float] | None:
        """(requests both answered, share the same) of `shadow` against `primaries` on one field (None: none)."""
        against = {p.replace(".", ":", 1) for p in primaries}
        rows = [a for a in self.agreement.get(shadow, []) if a["field"] == field_name and a["against"] in against]
        pairs = sum(a["pairs"] for a in rows)
        return (pairs, sum(a["agreement"] * a["pairs"] for a in rows) / pairs) if pairs else None

    def output_drift(self, candidate: str, baselines: frozenset[str]) -> tuple[str, float] | None:
        """The largest PSI between a candidate's answers and its baseline versions' over the last minute, field by
        field on their values (None: too few answers profiled on either side)."""

        def version(cluster: str) -> Version:
            model, _, number = cluster.partition(".")
            return model, number

        base = merged(self.current(version(c)) for c in sorted(baselines))
        found, _ = drift(base, self.current(version(candidate)))
        answers = [(d.field, d.psi) for d in found if d.side == "outputs" and d.of == "value"]
        return max(answers, key=lambda a: a[1]) if answers else None

    def current(self, version: Version) -> Profile:
        state = self.versions.get(version)
        return state.since(self._window() - CURRENT_WINDOWS) if state else Profile()

    def _judge(self) -> None:
        self.agreement = {
            shadow: agreement(
                self.answers.get(shadow, {}),
                [self.answers.get(p, {}) for p in sorted(primaries)],
                sorted(primaries),
                shared,
            )
            for shadow, primaries, shared in self.relations()
        }
        now = self.clock()
        for shadow, rows in self.agreement.items():
            seen = {f"{a['field']} vs {a['against']}": a["agreement"] for a in rows}
            self.agreement_history.setdefault(shadow, deque(maxlen=KEEP_WINDOWS)).append((now, seen))
        for version, state in self.versions.items():
            base = self.baselines.get(version)
            if base is None:
                state.drift, state.too_few = [], []
                continue
            state.drift, state.too_few = drift(base.profile, self.current(version))
            psi = {f"{d.side}.{d.field} ({d.of})": d.psi for d in state.drift}
            self.drift_history.setdefault(version, deque(maxlen=KEEP_WINDOWS)).append((now, psi))
        for gone in set(self.drift_history) - set(self.versions):
            del self.drift_history[gone]
        for shadow in set(self.agreement_history) - set(self.agreement):
            del self.agreement_history[shadow]

    async def _read_baselines(self) -> None:
        try:
            index, items = await self.client.kv.get(self.prefix, recurse=True)
        except (aiohttp.ClientError, OSError, TimeoutError, consul.ConsulException):
            return  # kept as last read
        if index is not None and index == self.baselines_index:
            return  # nothing changed since the last read: their sketches are not parsed again
        self.baselines_index = index
        found, broken = {}, {}
        for item in items or []:
            key = str(item.get("Key", ""))[len(self.prefix) :]
            model, _, version = key.partition(".")
            try:
                record = json.loads(item.get("Value") or b"")
                found[(model, version)] = Baseline(
                    read_profile(record["profile"]),
                    float(record["threshold"]),
                    str(record["created_at"]),
                    int(record["window_seconds"]),
                    int(record["requests"]),
                    str(record.get("source", "traffic"))[:200],
                )
            except (ValueError, KeyError, TypeError, RuntimeError) as err:
                broken[(model, version)] = f"{type(err).__name__}: {err}"[:200]
        self.baselines, self.broken_baselines = found, broken

    async def set_baseline(self, model: str, version: str, seconds: int, threshold: float) -> Baseline:
        """The last `seconds` of the version's traffic as its baseline (MonitorError if there is none)."""
        state = self.versions.get((model, version))
        profile = state.since(self._window() - max(1, seconds // self.window_seconds)) if state else Profile()
        if not profile.requests:
            raise MonitorError(
                f"no profiled requests of {model}:{version} in the last {seconds}s (is it serving, and profiled:"
                " --profile-percent above 0, datasketches in its environment?)"
            )
        if profile.requests < MIN_COUNT:  # a baseline that could never judge drift: every field "too few"
            raise MonitorError(
                f"only {profile.requests} profiled requests of {model}:{version} in the last {seconds}s; drift is"
                f" judged on at least {MIN_COUNT} (a longer --window, or more traffic first)"
            )
        return await self._keep(model, version, profile, threshold, seconds, "traffic")

    async def set_reference_baseline(
        self, model: str, version: str, window: Mapping[str, Any], threshold: float, source: str
    ) -> Baseline:
        """A profile window made from the package's reference data (models/reference.py) as the baseline."""
        try:
            profile = read_profile(window)
        except (ValueError, RuntimeError) as err:
            raise MonitorError(f"the reference data does not profile: {err}") from err
        return await self._keep(model, version, profile, threshold, 0, source)

    async def _keep(
        self, model: str, version: str, profile: Profile, threshold: float, seconds: int, source: str
    ) -> Baseline:
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock()))
        record = {
            "profile": profile.write(),
            "threshold": threshold,
            "created_at": created,
            "window_seconds": seconds,
            "requests": profile.requests,
            "source": source,
        }
        text = json.dumps(record)
        if len(text) > MAX_BASELINE:
            raise MonitorError(f"the baseline is {len(text)} bytes, over {MAX_BASELINE}: too many fields to keep")
        try:
            await self.client.kv.put(self.prefix + model_cluster(model, version), text)
        except (aiohttp.ClientError, OSError, TimeoutError, consul.ConsulException) as err:
            raise MonitorError(f"Consul: {err}") from err
        baseline = Baseline(profile, threshold, created, seconds, profile.requests, source)
        self.baselines[(model, version)] = baseline
        self._judge()
        return baseline

    def status(self, wanted: Version | None = None) -> list[dict[str, Any]]:
        """Per model version: its current profile's fields, its baseline, each field's drift."""
        rows = []
        for version in sorted(set(self.versions) | set(self.baselines)):
            if wanted is not None and version != wanted:
                continue
            state = self.versions.get(version, VersionState())
            base = self.baselines.get(version)
            now = self.current(version)
            rows.append(
                {
                    "model": version[0],
                    "version": version[1],
                    "requests": now.requests,
                    "fields": {
                        f"{side}.{n}": summary(p) for side, fields in now.sides.items() for n, p in fields.items()
                    },
                    "baseline": None
                    if base is None
                    else {
                        "created_at": base.created_at,
                        "requests": base.requests,
                        "window_seconds": base.window_seconds,
                        "threshold": base.threshold,
                        "source": base.source,
                    },
                    "broken_baseline": self.broken_baselines.get(version),
                    "drift": [d.__dict__ for d in state.drift],
                    "too_few": state.too_few,
                    "agreement": self.agreement.get(model_cluster(*version), []),
                }
            )
        return rows

    def page(self) -> list[dict[str, Any]]:
        """status(), with what the monitoring page draws: each field's baseline and current shares in its
        drift's bins, drift and agreement over the last ten minutes."""
        rows = self.status()
        for row in rows:
            version = (row["model"], row["version"])
            base, now = self.baselines.get(version), self.current(version)
            row["bins"] = {
                f"{side}.{name}": bins(field_base, now.sides[side][name])
                for side in now.sides
                if base is not None
                for name, field_base in base.profile.sides[side].items()
                if name in now.sides[side]
            }
            row["drift_over_time"] = list(self.drift_history.get(version, ()))
            row["agreement_over_time"] = list(self.agreement_history.get(model_cluster(*version), ()))
        return rows


def agreement(
    shadow: Mapping[str, dict[str, Any]],
    primaries: Sequence[Mapping[str, dict[str, Any]]],
    names: Sequence[str],
    shared: bool = False,
) -> list[dict[str, Any]]:
    """Per primary version and field: on how many of the requests both answered, and the share where the
    shadow answered the same (strings and booleans equal, numbers within NUMBER_TOLERANCE). `shared`: only the
    fields both answered count (an ensemble member answers part of what its join does)."""
    tally: dict[tuple[str, str], list[int]] = {}
    for rid, mine in shadow.items():
        for name, answers in zip(names, primaries, strict=True):
            theirs = answers.get(rid)
            if theirs is None:
                continue
            for field_name, value in theirs.items():
                if shared and field_name not in mine:
                    continue
                counts = tally.setdefault((name, field_name), [0, 0])
                counts[0] += 1
                counts[1] += _same(value, mine.get(field_name))
    return [
        {"against": name.replace(".", ":", 1), "field": f, "pairs": n, "agreement": round(same / n, 4)}
        for (name, f), (n, same) in sorted(tally.items())
    ]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, int | float) or not isinstance(b, int | float):
        return a == b and type(a) is type(b)
    return math.isclose(a, b, rel_tol=NUMBER_TOLERANCE, abs_tol=1e-9)
