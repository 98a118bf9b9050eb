"""What a model version sees and answers: a sampled profile of its fields, in mergeable sketches, per time window.

For a share of requests (`--profile-percent`, default 5) the runtime adds each
top-level field of the payload (`inputs`) and of predict's answer (`outputs`) to
the current window's profile: counts, nulls, the kinds of values; numbers into a
KLL quantile sketch, strings and booleans into a frequent-items sketch, lengths of
strings and lists into another KLL sketch. Apache DataSketches (`datasketches`,
the C++ library's Python binding): sketches of bounded size with stated error
that merge across replicas and windows, which the control plane needs
(controlplane/monitoring/). A window closes every WINDOW_SECONDS; the control
plane reads closed windows at GET /profiles?after=<window id>.

Bounded: at most MAX_FIELDS fields a side (more are counted, not profiled),
strings cut to MAX_ITEM_CHARS for the items sketch, KLL k=200 (about 1.3% rank
error), MAX_ITEMS tracked items per field, the last KEEP_WINDOWS closed windows
kept. NaN and infinities are counted as `odd`, never sketched. Without
`datasketches` importable in the model's environment, profiling is off and
/profiles says why.
"""

from __future__ import annotations

import base64
import importlib.util
import math
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

# Apache DataSketches (and numpy with it, ~0.3 s of CPU) is imported aside, in a thread the Profiler starts, not
# on the runtime's way to serving; a model environment where it does not resolve has profiling off.
AVAILABLE = importlib.util.find_spec("datasketches") is not None
_ds: Any = None


def sketches() -> Any:
    """The datasketches module, imported on first use."""
    global _ds
    if _ds is None:
        import datasketches

        _ds = datasketches
    return _ds


WINDOW_SECONDS = 10
KEEP_WINDOWS = 60  # ten minutes
MAX_FIELDS = 64
MAX_ITEM_CHARS = 64
KLL_K = 200
ITEMS_LG_MAX = 6  # 2^6 = 64 items tracked per field
OTHER = "(other fields)"
MAX_ANSWERS = 2000  # answers kept per window for agreement (requests of a stage with a shadow)
MAX_ANSWER_FIELDS = 16
MAX_ID_CHARS = 64


def _b64(sketch: Any) -> str:
    return base64.b64encode(sketch.serialize()).decode()


class FieldProfile:
    __slots__ = ("count", "items", "kinds", "lengths", "nulls", "numbers", "odd")

    def __init__(self) -> None:
        self.count = 0
        self.nulls = 0
        self.odd = 0
        self.kinds: Counter[str] = Counter()
        self.numbers: Any = None
        self.items: Any = None
        self.lengths: Any = None

    def add(self, value: Any) -> None:
        self.count += 1
        if value is None:
            self.nulls += 1
            self.kinds["null"] += 1
        elif isinstance(value, bool):
            self.kinds["bool"] += 1
            self._item("true" if value else "false")
        elif isinstance(value, int | float):
            self.kinds["number"] += 1
            number = float(value)
            if not math.isfinite(number):
                self.odd += 1
                return
            if self.numbers is None:
                self.numbers = sketches().kll_floats_sketch(KLL_K)
            self.numbers.update(number)
        elif isinstance(value, str):
            self.kinds["string"] += 1
            self._item(value[:MAX_ITEM_CHARS])
            self._length(len(value))
        elif isinstance(value, list):
            self.kinds["list"] += 1
            self._length(len(value))
        else:
            self.kinds["object"] += 1

    def _item(self, text: str) -> None:
        if self.items is None:
            self.items = sketches().frequent_strings_sketch(ITEMS_LG_MAX)
        self.items.update(text)

    def _length(self, n: int) -> None:
        if self.lengths is None:
            self.lengths = sketches().kll_floats_sketch(KLL_K)
        self.lengths.update(float(n))

    def export(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.count, "nulls": self.nulls, "odd": self.odd, "kinds": dict(self.kinds)}
        for name in ("numbers", "items", "lengths"):
            sketch = getattr(self, name)
            if sketch is not None:
                out[name] = _b64(sketch)
        return out


class Window:
    def __init__(self, wid: int) -> None:
        self.id = wid
        self.requests = 0
        self.sides: dict[str, dict[str, FieldProfile]] = {"inputs": {}, "outputs": {}}
        self.extra_fields = 0  # fields beyond MAX_FIELDS, counted
        self.answers: dict[str, dict[str, Any]] = {}  # request id -> the answer's scalar fields
        self.answers_dropped = 0

    def add(self, side: str, record: dict[str, Any]) -> None:
        fields = self.sides[side]
        for name, value in record.items():
            profile = fields.get(name)
            if profile is None:
                if len(fields) >= MAX_FIELDS or not isinstance(name, str) or len(name) > 256:
                    self.extra_fields += 1
                    continue
                profile = fields[name] = FieldProfile()
            profile.add(value)

    def export(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "requests": self.requests,
            "extra_fields": self.extra_fields,
            "answers": self.answers,
            "answers_dropped": self.answers_dropped,
            **{side: {n: p.export() for n, p in fields.items()} for side, fields in self.sides.items()},
        }


class Profiler:
    """The runtime's sampled profiles, one window at a time (not thread-safe: the event loop's)."""

    def __init__(
        self, percent: float, clock: Callable[[], float] = time.time, rng: Callable[[], float] = random.random
    ) -> None:
        self.percent = percent if AVAILABLE else 0.0
        self.clock = clock
        self.rng = rng
        self.current: Window | None = None
        self.closed: deque[Window] = deque(maxlen=KEEP_WINDOWS)
        self.failed = 0  # values a sketch refused (counted; the request is never affected)
        self._loading: threading.Thread | None = None
        if self.percent > 0 and _ds is None:  # loaded aside while the runtime starts (its sidecar, its listeners
            # and the model's loader run meanwhile): the start waits for it less, first requests not at all
            self._loading = threading.Thread(target=sketches, name="load-datasketches", daemon=True)
            self._loading.start()

    def loaded(self, timeout: float) -> None:
        """Wait (at most `timeout` s) for the sketches' import started with this profiler."""
        if self._loading is not None:
            self._loading.join(timeout)

    @property
    def off_because(self) -> str:
        return "" if AVAILABLE else "datasketches is not importable in this environment"

    def offer(self, payload: dict[str, Any], answer: dict[str, Any]) -> None:
        """Profile this request's fields if it is sampled; cheap when it is not."""
        if self.percent <= 0 or self.rng() * 100 >= self.percent:
            return
        window = self._window()
        window.requests += 1
        try:
            window.add("inputs", payload)
            window.add("outputs", answer)
        except Exception:  # a sketch's own failure never fails a request
            self.failed += 1

    def answer(self, request_id: str, answer: dict[str, Any]) -> None:
        """Keep this answer's scalar fields by request id: the stage has a shadow, whose answer to the same
        request the control plane compares with it (agreement). Not sampled: every mirrored copy pairs."""
        if self.percent <= 0 or not 0 < len(request_id) <= MAX_ID_CHARS:
            return
        window = self._window()
        if len(window.answers) >= MAX_ANSWERS:
            window.answers_dropped += 1
            return
        kept: dict[str, Any] = {}
        for name, value in answer.items():
            if len(kept) >= MAX_ANSWER_FIELDS:
                break
            if isinstance(value, str):
                kept[name] = value[:MAX_ITEM_CHARS]
            elif isinstance(value, bool) or (isinstance(value, int | float) and math.isfinite(value)):
                kept[name] = value
        window.answers[request_id] = kept

    def _window(self) -> Window:
        wid = int(self.clock() // WINDOW_SECONDS)
        if self.current is None or self.current.id != wid:
            if self.current is not None:
                self.closed.append(self.current)
            self.current = Window(wid)
        return self.current

    def export(self, after: int) -> dict[str, Any]:
        """Closed windows newer than `after` (a window id), for the control plane."""
        wid = int(self.clock() // WINDOW_SECONDS)
        if self.current is not None and self.current.id < wid:  # closed by time, with no request since
            self.closed.append(self.current)
            self.current = None
        return {
            "window_seconds": WINDOW_SECONDS,
            "percent": self.percent,
            "off_because": self.off_because,
            "failed": self.failed,
            "windows": [w.export() for w in self.closed if w.id > after],
        }
