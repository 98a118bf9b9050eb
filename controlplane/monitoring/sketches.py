"""Profiles merged and compared, pure: the runtimes' field sketches (runtime_sdk/profiles.py) -> drift.

A profile is, per side (`inputs`, `outputs`) and field, counts and up to three
DataSketches: `numbers` (KLL), `items` (frequent strings), `lengths` (KLL).
Merging adds counts and merges sketches, so replicas and windows combine
exactly as one stream would have.

Drift of a field against its baseline, on its values and on its lengths:
- PSI (population stability index), the industry's drift score: over the
  baseline's deciles for numbers and lengths, over the baseline's most frequent
  items (and "the rest") for categories; shares floored at 1e-4. The usual
  reading: < 0.1 stable, 0.1-0.2 moving, > 0.2 drifted (the default threshold).
- A distance with a meaning of its own beside it: for numbers and lengths the
  Kolmogorov-Smirnov statistic (the largest gap between the two CDFs, read from
  both sketches at the union of their percentiles); for categories the total
  variation distance (half the sum of the share differences: the share of
  requests that would have to change category).
Both need MIN_COUNT values on each side; fewer, and the field is "too few", not
guessed.
"""

from __future__ import annotations

import base64
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import datasketches as ds

SIDES = ("inputs", "outputs")
MIN_COUNT = 50
FLOOR = 1e-4
TOP_ITEMS = 20  # categories told apart in a PSI; the rest are one bin
DECILES = [i / 10 for i in range(1, 10)]
PERCENTILES = [i / 100 for i in range(1, 100)]


def _kll(text: str | None) -> Any:
    return ds.kll_floats_sketch.deserialize(base64.b64decode(text)) if text else None


def _items(text: str | None) -> Any:
    return ds.frequent_strings_sketch.deserialize(base64.b64decode(text)) if text else None


@dataclass
class FieldProfile:
    count: int = 0
    nulls: int = 0
    odd: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    numbers: Any = None
    items: Any = None
    lengths: Any = None

    @classmethod
    def read(cls, raw: Mapping[str, Any]) -> FieldProfile:
        kinds = raw.get("kinds") or {}
        return cls(
            int(raw.get("count", 0)),
            int(raw.get("nulls", 0)),
            int(raw.get("odd", 0)),
            Counter({str(k): int(v) for k, v in kinds.items()}) if isinstance(kinds, dict) else Counter(),
            _kll(raw.get("numbers")),
            _items(raw.get("items")),
            _kll(raw.get("lengths")),
        )

    def merge(self, other: FieldProfile) -> None:
        self.count += other.count
        self.nulls += other.nulls
        self.odd += other.odd
        self.kinds.update(other.kinds)
        for name in ("numbers", "items", "lengths"):
            theirs = getattr(other, name)
            if theirs is None:
                continue
            mine = getattr(self, name)
            if mine is None:  # a copy, so that merging into it never changes the other's
                setattr(self, name, type(theirs).deserialize(theirs.serialize()))
            else:
                mine.merge(theirs)

    def write(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.count, "nulls": self.nulls, "odd": self.odd, "kinds": dict(self.kinds)}
        for name in ("numbers", "items", "lengths"):
            sketch = getattr(self, name)
            if sketch is not None:
                out[name] = base64.b64encode(sketch.serialize()).decode()
        return out


@dataclass
class Profile:
    requests: int = 0
    sides: dict[str, dict[str, FieldProfile]] = field(default_factory=lambda: {s: {} for s in SIDES})

    def add_window(self, window: Mapping[str, Any]) -> None:
        """Merge one window as a runtime exported it (unknown or broken parts raise ValueError)."""
        self.requests += int(window.get("requests", 0))
        for side in SIDES:
            fields = window.get(side) or {}
            if not isinstance(fields, dict):
                raise ValueError(f"{side}: not a mapping")
            for name, raw in fields.items():
                if not isinstance(raw, dict):
                    raise ValueError(f"{side}.{name}: not a mapping")
                self.sides[side].setdefault(str(name), FieldProfile()).merge(FieldProfile.read(raw))

    def merge(self, other: Profile) -> None:
        self.requests += other.requests
        for side in SIDES:
            for name, theirs in other.sides[side].items():
                self.sides[side].setdefault(name, FieldProfile()).merge(theirs)

    def write(self) -> dict[str, Any]:
        return {"requests": self.requests, **{s: {n: f.write() for n, f in self.sides[s].items()} for s in SIDES}}


def merged(profiles: Iterable[Profile]) -> Profile:
    out = Profile()
    for p in profiles:
        out.merge(p)
    return out


def read_profile(raw: Mapping[str, Any]) -> Profile:
    profile = Profile()
    profile.add_window(raw)
    return profile


def _psi(base: list[float], now: list[float]) -> float:
    return sum((n - b) * math.log(n / b) for b, n in zip(_floored(base), _floored(now), strict=True))


def _floored(shares: list[float]) -> list[float]:
    return [max(s, FLOOR) for s in shares]


def _masses(sketch: Any, edges: list[float]) -> list[float]:
    cdf = sketch.get_cdf(edges, True)  # P(v <= edge): the last bin holds what lies above the baseline
    return [cdf[0], *(cdf[i] - cdf[i - 1] for i in range(1, len(cdf)))]


def _numeric(base: Any, now: Any) -> tuple[float, float] | None:
    if base is None or now is None or base.n < MIN_COUNT or now.n < MIN_COUNT:
        return None
    edges = sorted(set(base.get_quantiles(DECILES)))
    psi = _psi(_masses(base, edges), _masses(now, edges))
    points = sorted(set(base.get_quantiles(PERCENTILES)) | set(now.get_quantiles(PERCENTILES)))
    ks = max(abs(a - b) for a, b in zip(base.get_cdf(points, True), now.get_cdf(points, True), strict=True))
    return psi, ks


def _categorical(base: Any, now: Any) -> tuple[float, float] | None:
    if base is None or now is None or base.total_weight < MIN_COUNT or now.total_weight < MIN_COUNT:
        return None
    top = base.get_frequent_items(ds.frequent_items_error_type.NO_FALSE_NEGATIVES)[:TOP_ITEMS]
    names = [row[0] for row in top]
    b_total, n_total = base.total_weight, now.total_weight
    b = [base.get_estimate(x) / b_total for x in names]
    n = [now.get_estimate(x) / n_total for x in names]
    b.append(max(0.0, 1 - sum(b)))
    n.append(max(0.0, 1 - sum(n)))
    return _psi(b, n), 0.5 * sum(abs(x - y) for x, y in zip(b, n, strict=True))


@dataclass(frozen=True)
class Drift:
    side: str
    field: str
    of: str  # "value" or "length"
    psi: float
    distance: float  # KS for numbers and lengths, total variation for categories
    measure: str  # "ks" or "tvd"


def drift(baseline: Profile, current: Profile) -> tuple[list[Drift], list[str]]:
    """Each field's drift on its values and lengths, and the fields with too few values to judge."""
    found, too_few = [], []
    for side in SIDES:
        for name, base in baseline.sides[side].items():
            now = current.sides[side].get(name)
            if now is None:
                too_few.append(f"{side}.{name}")
                continue
            judged = False
            value = _numeric(base.numbers, now.numbers)
            if value is not None:
                found.append(Drift(side, name, "value", *value, "ks"))
                judged = True
            else:
                value = _categorical(base.items, now.items)
                if value is not None:
                    found.append(Drift(side, name, "value", *value, "tvd"))
                    judged = True
            length = _numeric(base.lengths, now.lengths)
            if length is not None:
                found.append(Drift(side, name, "length", *length, "ks"))
                judged = True
            if not judged:
                too_few.append(f"{side}.{name}")
    return found, too_few


def summary(p: FieldProfile) -> dict[str, Any]:
    """A field for people: counts, kinds, median and p99 of numbers and lengths, the top items."""
    out: dict[str, Any] = {"count": p.count, "nulls": p.nulls, "odd": p.odd, "kinds": dict(p.kinds)}
    for name in ("numbers", "lengths"):
        sketch = getattr(p, name)
        if sketch is not None and sketch.n:
            out[name] = {"p50": sketch.get_quantile(0.5), "p99": sketch.get_quantile(0.99)}
    if p.items is not None and p.items.total_weight:
        total = p.items.total_weight
        top = p.items.get_frequent_items(ds.frequent_items_error_type.NO_FALSE_NEGATIVES)[:5]
        out["top"] = {row[0]: round(row[1] / total, 4) for row in top}
    return out


def bins(base: FieldProfile, now: FieldProfile) -> list[dict[str, Any]]:
    """The baseline's and the current shares in the bins drift is measured over, to draw them over each other."""
    found = []
    for of, b, n in (("value", base.numbers, now.numbers), ("length", base.lengths, now.lengths)):
        if b is not None and n is not None and b.n and n.n:
            edges = sorted(set(b.get_quantiles(DECILES)))
            labels = [f"<= {edges[0]:.3g}", *(f"<= {e:.3g}" for e in edges[1:]), f"> {edges[-1]:.3g}"]
            found.append({"of": of, "labels": labels, "baseline": _masses(b, edges), "current": _masses(n, edges)})
    if base.numbers is None and base.items is not None and now.items is not None and base.items.total_weight:
        top = base.items.get_frequent_items(ds.frequent_items_error_type.NO_FALSE_NEGATIVES)[:TOP_ITEMS]
        names = [row[0] for row in top]
        b_total, n_total = base.items.total_weight, max(now.items.total_weight, 1)
        b = [base.items.get_estimate(x) / b_total for x in names]
        n = [now.items.get_estimate(x) / n_total for x in names]
        found.insert(
            0,
            {
                "of": "value",
                "labels": [*names, "(the rest)"],
                "baseline": [*b, max(0.0, 1 - sum(b))],
                "current": [*n, max(0.0, 1 - sum(n))],
            },
        )
    return found
