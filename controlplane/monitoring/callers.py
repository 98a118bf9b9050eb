"""Admission per caller key, read from every runtime (GET /admission) and merged per model version: what
`mllambda status` and the dashboard show as admitted and refused per key (issue 44).

A runtime counts each decision of its admission by the caller key the gateway put on the request (the
pipeline's fairness header, or the client's identity): the first 32 keys by name, the rest as "(other)". Every
READ_EVERY seconds each runtime on this host (or, under mTLS, through its sidecar's ingress, for control planes
only) is read; a runtime's counts run from its start, so a replica that is gone takes its counts with it. A
version's keys are merged over its replicas and bounded again (MAX_KEYS by name, the most requests first).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from contract.service import RuntimeService
from controlplane.monitoring.runtimes import poll_forever, read_at_most, runtime_url

log = logging.getLogger("mllambda.callers")

READ_EVERY = 5.0  # seconds between reads of every runtime
MAX_KEYS = 32  # caller keys per model version shown by name; the rest are folded into "(other)"
MAX_OUTCOMES = 8  # outcomes per key read from a runtime (it has five)
MAX_ANSWER = 64 * 1024  # bytes of one runtime's answer (33 keys of 64 characters, a few outcomes each)
OTHER = "(other)"


@dataclass(frozen=True)
class CallerCounts:
    """One caller key of one model version: requests admitted and refused (by why) over its live replicas."""

    model: str
    version: str
    caller: str
    admitted: int
    refused: dict[str, int] = field(default_factory=dict)  # "over share", "shed", "saturated", "waited too long"

    @property
    def total(self) -> int:
        return self.admitted + sum(self.refused.values())


Read = tuple[str, str, dict[str, dict[str, int]]]  # model, version, caller -> outcome -> count


def parse_answer(raw: bytes) -> dict[str, dict[str, int]]:
    """A runtime's /admission answer, checked (ValueError: not what a runtime sends)."""
    answer = json.loads(raw)
    callers = answer.get("callers") if isinstance(answer, dict) else None
    if not isinstance(callers, dict) or len(callers) > MAX_KEYS + 1:
        raise ValueError(f"callers: a mapping of at most {MAX_KEYS + 1} keys")
    found: dict[str, dict[str, int]] = {}
    for key, outcomes in callers.items():
        if not isinstance(key, str) or not 0 < len(key) <= 64 or not isinstance(outcomes, dict):
            raise ValueError("callers: keys of 1-64 characters, each a mapping of outcome to count")
        if len(outcomes) > MAX_OUTCOMES:
            raise ValueError(f"callers.{key}: at most {MAX_OUTCOMES} outcomes")
        counts = {}
        for outcome, n in outcomes.items():
            if not isinstance(outcome, str) or len(outcome) > 32 or type(n) is not int or n < 0:
                raise ValueError(f"callers.{key}: outcome names of at most 32 characters, counts of 0 or more")
            counts[outcome] = n
        found[key] = counts
    return found


def merged(reads: Iterable[Read]) -> list[CallerCounts]:
    """Counts per model version and caller key over replicas: at most MAX_KEYS keys per version by name (the
    most requests), the rest in "(other)"; versions in name order, keys by most refused then most requests."""
    per_version: dict[tuple[str, str], dict[str, dict[str, int]]] = {}
    for model, version, callers in reads:
        keys = per_version.setdefault((model, version), {})
        for key, outcomes in callers.items():
            into = keys.setdefault(key, {})
            for outcome, n in outcomes.items():
                into[outcome] = into.get(outcome, 0) + n
    rows = []
    for (model, version), keys in sorted(per_version.items()):
        named = sorted((k for k in keys if k != OTHER), key=lambda k: (-sum(keys[k].values()), k))
        folded = {OTHER: dict(keys.get(OTHER, {}))}
        for key in named[MAX_KEYS:]:
            for outcome, n in keys[key].items():
                folded[OTHER][outcome] = folded[OTHER].get(outcome, 0) + n
        shown = {k: keys[k] for k in named[:MAX_KEYS]} | ({OTHER: folded[OTHER]} if folded[OTHER] else {})
        version_rows = [
            CallerCounts(
                model,
                version,
                key,
                outcomes.get("admitted", 0),
                {o: n for o, n in outcomes.items() if o != "admitted" and n},
            )
            for key, outcomes in shown.items()
        ]
        rows += sorted(version_rows, key=lambda r: (-sum(r.refused.values()), -r.total, r.caller))
    return rows


class CallerBook:
    """Reads every runtime's admission counts; `rows()` is the merged picture as of the last read."""

    def __init__(self, instances: Callable[[], Sequence[RuntimeService]]) -> None:
        self.instances = instances
        self.reads: dict[str, Read] = {}  # service id -> its last answer
        self.tls: ssl.SSLContext | None = None  # under mTLS: our client certificate, for runtimes on other hosts

    async def run(self) -> None:
        await poll_forever(self.poll, READ_EVERY, "reading admission per caller")

    async def poll(self, session: aiohttp.ClientSession) -> None:
        secure = self.tls is not None
        readable = {i.service_id: (i, url) for i in self.instances() if (url := runtime_url(i, secure, "/admission"))}
        await asyncio.gather(*(self._read(session, i, url) for i, url in readable.values()))
        for gone in set(self.reads) - set(readable):
            del self.reads[gone]

    async def _read(self, session: aiohttp.ClientSession, i: RuntimeService, url: str) -> None:
        context: ssl.SSLContext | bool = self.tls if self.tls is not None and url.startswith("https:") else True
        try:
            async with session.get(url, ssl=context) as resp:
                if resp.status != 200:
                    return  # an older runtime, or one going away: its last read stands until it is gone
                raw = await read_at_most(resp, MAX_ANSWER)
            self.reads[i.service_id] = (i.model, i.version, parse_answer(raw))
        except (aiohttp.ClientError, TimeoutError, OSError):
            return
        except ValueError as err:
            log.warning("admission counts of %s not used: %s", i.service_id, str(err)[:200])

    def rows(self) -> list[CallerCounts]:
        return merged(self.reads.values())


def as_dicts(rows: Sequence[CallerCounts]) -> list[dict[str, Any]]:
    return [
        {"model": r.model, "version": r.version, "caller": r.caller, "admitted": r.admitted, "refused": r.refused}
        for r in rows
    ]


def refused_text(refused: Mapping[str, int]) -> str:
    """'3 over share, 1 shed' (or '-')."""
    return ", ".join(f"{n} {why}" for why, n in sorted(refused.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"
