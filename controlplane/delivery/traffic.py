"""Observed traffic per pipeline, stage and variant, from the Envoys' own stats.

Each Envoy that routes into a stage counts requests per upstream cluster
(`cluster.<model>.<version>.upstream_rq_total`), so summing a cluster over the
gateway and all sidecars gives what that model version received. Scraping is
I/O at the edge; `per_variant` is a pure function of pipelines and numbers.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from contract.naming import cluster_of_stat, model_cluster
from contract.service import RuntimeService
from controlplane.pipeline.model import Pipeline


@dataclass(frozen=True)
class ClusterStats:
    requests: int = 0
    errors: int = 0  # upstream 5xx
    p50_ms: float | None = None
    p99_ms: float | None = None
    retries: int = 0  # of those requests, retries (the hop before found this variant unreachable)
    p99_recent_ms: float | None = None  # over Envoy's last stats interval (5 s), not since it started
    in_flight: int = 0  # a gauge: requests sent and not yet answered, plus those waiting for a connection
    refused: int = 0  # answered 429 or 503 (a runtime's admission refuses with those: demand it did not take)


@dataclass(frozen=True)
class VariantTraffic:
    pipeline: str
    stage: str
    branch: str  # "" for a plain split, a branch key, an ensemble member ("m", "m/key", "(join)"); "(shadow)"
    model: str
    version: str
    configured_share: float
    observed_share: float | None
    requests: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    retries: int
    window_seconds: float | None = None  # what the counts cover (None: since the Envoys started)
    refused: int = 0  # answered 429 or 503: refused by the variant's runtimes (flow control) or unavailable


COUNTED = (
    "upstream_rq_total",
    "upstream_rq_5xx",
    "upstream_rq_retry",
    "upstream_rq_active",
    "upstream_rq_pending_active",  # gauges: in flight now
    "upstream_rq_429",
    "upstream_rq_503",
)


# A pipeline's requests its rate limit refused at the gateway (Envoy's `rate_limit.<pipeline>.<RATE_LIMITED_STAT>`)
# are kept among the clusters' counts as the `refused` of the key RATE_LIMITED + pipeline (no cluster is named so),
# so that readings, sums and windows need nothing of their own.
RATE_LIMITED = "(rate limited) "
RATE_LIMITED_STAT = "http_local_rate_limit.rate_limited"


def parse_envoy_stats(body: Mapping[str, Any]) -> dict[str, ClusterStats]:
    """Envoy `/stats?format=json` -> ClusterStats per cluster (and per rate-limited pipeline, RATE_LIMITED)."""
    counts: dict[str, dict[str, int]] = {}
    quantiles: dict[str, dict[str, float]] = {}
    for item in body.get("stats", []):
        name = item.get("name", "")
        if name.startswith("rate_limit.") and name.endswith("." + RATE_LIMITED_STAT) and "value" in item:
            pipeline = name[len("rate_limit.") : -len(RATE_LIMITED_STAT) - 1]
            counts.setdefault(RATE_LIMITED + pipeline, {})["upstream_rq_429"] = int(item["value"])
        if name.startswith("cluster.") and "value" in item:
            for suffix in COUNTED:
                if name.endswith("." + suffix):
                    cluster = cluster_of_stat(name[len("cluster.") : -len(suffix) - 1])
                    counts.setdefault(cluster, {})[suffix] = int(item["value"])
        histograms = item.get("histograms")
        if isinstance(histograms, dict):
            supported = histograms.get("supported_quantiles", [])
            for histogram in histograms.get("computed_quantiles", []):
                hname = histogram.get("name", "")
                if hname.startswith("cluster.") and hname.endswith(".upstream_rq_time"):
                    cluster = cluster_of_stat(hname[len("cluster.") : -len(".upstream_rq_time")])
                    pairs = list(zip(supported, histogram["values"], strict=False))
                    values = {str(q): v.get("cumulative") for q, v in pairs}
                    values["99-recent"] = next((v.get("interval") for q, v in pairs if str(q) == "99"), None)
                    quantiles[cluster] = {k: float(v) for k, v in values.items() if v is not None}
    return {
        cluster: ClusterStats(
            c.get("upstream_rq_total", 0),
            c.get("upstream_rq_5xx", 0),
            quantiles.get(cluster, {}).get("50"),
            quantiles.get(cluster, {}).get("99"),
            c.get("upstream_rq_retry", 0),
            quantiles.get(cluster, {}).get("99-recent"),
            c.get("upstream_rq_active", 0) + c.get("upstream_rq_pending_active", 0),
            c.get("upstream_rq_429", 0) + c.get("upstream_rq_503", 0),
        )
        for cluster, c in counts.items()
    }


def merge(per_envoy: Iterable[Mapping[str, ClusterStats]]) -> dict[str, ClusterStats]:
    """Sum counts; latency quantiles are request-weighted averages (an approximation)."""
    merged: dict[str, ClusterStats] = {}
    for stats in per_envoy:
        for cluster, s in stats.items():
            old = merged.get(cluster, ClusterStats())
            total = old.requests + s.requests
            merged[cluster] = ClusterStats(
                total,
                old.errors + s.errors,
                _blend(old.p50_ms, old.requests, s.p50_ms, s.requests),
                _blend(old.p99_ms, old.requests, s.p99_ms, s.requests),
                old.retries + s.retries,
                _blend(old.p99_recent_ms, old.requests, s.p99_recent_ms, s.requests),
                old.in_flight + s.in_flight,
                old.refused + s.refused,
            )
    return merged


def _blend(a: float | None, wa: int, b: float | None, wb: int) -> float | None:
    if a is None or wa == 0:
        return b
    if b is None or wb == 0:
        return a
    return (a * wa + b * wb) / (wa + wb)


def p99_same_seconds(
    candidate: ClusterStats, baseline: Iterable[ClusterStats | None]
) -> tuple[float | None, float | None]:
    """A rollout's candidate p99 and its baseline's (request-weighted over the baseline's variants), both over
    Envoy's last stats interval: the same seconds, so a host that slows down slows both. Since the Envoys
    started, the candidate's p99 would be the slowest of its first few dozen requests against the baseline's
    thousands (a busy CI host rolled a good candidate back on that: 24 against 3 ms)."""
    weighted = [(s.p99_recent_ms, s.requests) for s in baseline if s is not None and s.p99_recent_ms is not None]
    total = sum(n for _, n in weighted)
    return candidate.p99_recent_ms, (sum(q * n for q, n in weighted) / total if total else None)


def per_variant(pipelines: Sequence[Pipeline], stats: Mapping[str, ClusterStats]) -> list[VariantTraffic]:
    """Configured vs observed share for every split group (a stage, one branch of it, an ensemble's member)."""
    rows: list[VariantTraffic] = []
    for p in pipelines:
        for stage in p.stages:
            totals: dict[str, int] = {}  # requests per member ("" for a plain stage) into its split groups
            for group, variants in stage.groups():
                weights = sum(v.weight for v in variants) or 1
                total = sum(stats.get(v.cluster, ClusterStats()).requests for v in variants)
                member = group.split("/", 1)[0] if stage.members else ""
                totals[member] = totals.get(member, 0) + total
                for v in variants:
                    rows.append(_row((p.name, stage.name, group), v.model, v.version, v.weight / weights, total, stats))
            for member, s in stage.shadows():
                where = (p.name, stage.name, f"{member} (shadow)" if member else "(shadow)")
                rows.append(_row(where, s.model, s.version, s.percent / 100, totals.get(member, 0), stats))
    return rows


def rate_limited(pipelines: Iterable[str], stats: Mapping[str, ClusterStats]) -> dict[str, int]:
    """Requests each pipeline's rate limit refused at the gateway (since the gateway started), for those named."""
    return {p: stats[RATE_LIMITED + p].refused for p in pipelines if RATE_LIMITED + p in stats}


def delta(now: Mapping[str, ClusterStats], then: Mapping[str, ClusterStats]) -> dict[str, ClusterStats]:
    """Counts between two readings (latency quantiles and in-flight are the newer reading's).

    A restarted Envoy counts from 0.
    """
    found = {}
    for cluster, s in now.items():
        old = then.get(cluster, ClusterStats())
        found[cluster] = ClusterStats(
            max(0, s.requests - old.requests),
            max(0, s.errors - old.errors),
            s.p50_ms,
            s.p99_ms,
            max(0, s.retries - old.retries),
            s.p99_recent_ms,
            s.in_flight,
            max(0, s.refused - old.refused),
        )
    return found


class TrafficHistory:
    """Readings of every Envoy's counters over time, so shares can be observed over a window, not since start."""

    def __init__(self, kept: int = 720) -> None:
        self._readings: deque[tuple[float, dict[str, ClusterStats]]] = deque(maxlen=kept)  # bounded: ~1 h at 5 s

    def add(self, at: float, stats: Mapping[str, ClusterStats]) -> None:
        self._readings.append((at, dict(stats)))

    def readings(self) -> list[tuple[float, dict[str, ClusterStats]]]:
        return list(self._readings)

    def first_since(self, start: float) -> tuple[float, dict[str, ClusterStats]] | None:
        """The earliest reading taken at or after `start` (None: none yet)."""
        return next(((at, stats) for at, stats in self._readings if at >= start), None)


def _row(
    where: tuple[str, str, str],
    model: str,
    version: str,
    configured: float,
    total: int,
    stats: Mapping[str, ClusterStats],
) -> VariantTraffic:
    s = stats.get(model_cluster(model, version)) or ClusterStats()
    observed = s.requests / total if total else None
    return VariantTraffic(
        *where,
        model,
        version,
        configured,
        observed,
        s.requests,
        s.errors,
        s.p50_ms,
        s.p99_ms,
        s.retries,
        refused=s.refused,
    )


STATS = "/stats?format=json&usedonly&filter=^%28cluster%7Crate_limit%29%5C."  # ^(cluster|rate_limit)\.


def stats_urls(instances: Iterable[RuntimeService], gateway_admin_port: int, secure: bool) -> list[str]:
    """Where to read each Envoy's counters: the admin port when it is on this host (127.0.0.1);
    elsewhere, under mTLS, the ingress's /stats route, which admits the control plane's identity only."""
    urls = [f"http://127.0.0.1:{gateway_admin_port}{STATS}"] if gateway_admin_port else []
    for i in instances:
        if i.envoy_admin_port and i.host == "127.0.0.1":
            urls.append(f"http://127.0.0.1:{i.envoy_admin_port}{STATS}")
        elif i.envoy_admin_port and secure and i.tls_dir:
            urls.append(i.ingress_url(STATS))
    return urls


class TrafficScraper:
    """Reads every Envoy's stats at most once per `max_age` seconds (with `tls`: our client certificate)."""

    def __init__(self, max_age: float = 1.0) -> None:
        self.tls: ssl.SSLContext | None = None
        self.max_age = max_age
        self._at = 0.0
        self._stats: dict[str, ClusterStats] = {}
        self._lock = asyncio.Lock()

    async def stats(self, urls: Iterable[str]) -> dict[str, ClusterStats]:
        async with self._lock:
            if time.monotonic() - self._at >= self.max_age:
                self._stats, self._at = await self.read(urls), time.monotonic()
            return self._stats

    async def read(self, urls: Iterable[str]) -> dict[str, ClusterStats]:
        """Every Envoy's counters now, bypassing the cache (which the people reading it keep fresh)."""
        timeout = aiohttp.ClientTimeout(total=2)
        connector = aiohttp.TCPConnector(ssl=self.tls) if self.tls else None
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            return merge(await asyncio.gather(*(self._one(session, url) for url in set(urls))))

    async def _one(self, session: aiohttp.ClientSession, url: str) -> dict[str, ClusterStats]:
        try:
            async with session.get(url) as resp:
                return parse_envoy_stats(await resp.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return {}  # an Envoy that is going away does not hide the others


WINDOW = 60.0  # seconds of traffic the dashboard and `status` observe shares over
READ_EVERY = 5.0  # seconds between readings of every Envoy's counters


class TrafficBook:
    """Every Envoy's counters: as they are (for /metrics), and over a recent window of each pipeline's version."""

    def __init__(self, urls: Callable[[], list[str]]) -> None:
        self.urls = urls
        self.scraper = TrafficScraper()
        self.history = TrafficHistory()
        self.entered = asyncio.Event()  # set when a version enters traffic: read at once, its window starts there

    async def stats(self) -> dict[str, ClusterStats]:
        return await self.scraper.stats(self.urls())

    async def recent(
        self, pipelines: Sequence[Pipeline], entered_at: Callable[[str], float | None]
    ) -> list[VariantTraffic]:
        """Per variant over the last WINDOW seconds, counted from the first reading after the version entered.

        The previous version's traffic never mixes in; `window_seconds` says what the counts cover.
        """
        current, now, rows = await self.stats(), time.monotonic(), []
        for p in pipelines:
            base = self.history.first_since(max(now - WINDOW, entered_at(p.name) or now))
            counted = delta(current, base[1]) if base else {}
            seconds = round(now - base[0], 1) if base else 0.0
            rows += [replace(r, window_seconds=seconds) for r in per_variant([p], counted)]
        return rows

    async def run(self, active: Callable[[], bool]) -> None:
        """A reading every READ_EVERY seconds while there is something to read, and at once on `entered`."""
        while True:
            if active():
                at = time.monotonic()
                self.history.add(at, await self.scraper.read(self.urls()))  # one not answering counts empty
            try:
                await asyncio.wait_for(self.entered.wait(), READ_EVERY)
            except TimeoutError:
                pass
            self.entered.clear()
