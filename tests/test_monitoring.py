"""Model monitoring without the network: the runtime's profiles and their bounds, merging, drift."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from typing import Any

import pytest

from controlplane.models.reference import SHOWN, BadReference, profile_window, read_records
from controlplane.monitoring.sketches import MIN_COUNT, drift, merged, read_profile, summary
from runtime_sdk import profiles
from runtime_sdk.profiles import KEEP_WINDOWS, MAX_FIELDS, MAX_ITEM_CHARS, WINDOW_SECONDS, Profiler


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def profiled(make: Any, n: int = 1000, seed: int = 1) -> Any:
    """n requests through a profiler at 100%, every one in one window; that window as the control plane reads it."""
    rng = random.Random(seed)
    clock = Clock()
    profiler = Profiler(100, clock=clock)
    for i in range(n):
        profiler.offer(*make(rng, i))
    clock.now += WINDOW_SECONDS
    (window,) = profiler.export(0)["windows"]
    return read_profile(json.loads(json.dumps(window)))


def english(rng: random.Random, i: int) -> tuple[dict[str, Any], dict[str, Any]]:
    text = rng.choice(["hi there", "good day", "the cat sat"])
    return {"text": text, "x": rng.gauss(0, 1)}, {"category": rng.choice(["a", "b"]), "score": rng.random()}


def test_the_same_mix_is_stable_and_a_new_one_drifts_on_the_fields_it_moves() -> None:
    base, same = profiled(english, seed=1), profiled(english, seed=2)
    found, too_few = drift(base, same)
    assert too_few == [] and all(d.psi < 0.1 for d in found), found

    def foreign(rng: random.Random, i: int) -> tuple[dict[str, Any], dict[str, Any]]:
        request, answer = english(rng, i)
        return {**request, "text": "der schnelle braune Fuchs springt", "x": rng.gauss(2, 1)}, answer

    moved = {(d.side, d.field, d.of): d for d in drift(base, profiled(foreign))[0]}
    assert moved[("inputs", "text", "value")].psi > 1 and moved[("inputs", "text", "value")].measure == "tvd"
    assert moved[("inputs", "text", "length")].psi > 1 and moved[("inputs", "text", "length")].distance > 0.9
    assert moved[("inputs", "x", "value")].psi > 1 and 0.6 < moved[("inputs", "x", "value")].distance < 0.8  # KS
    assert moved[("outputs", "category", "value")].psi < 0.1  # the answers did not move


def test_replicas_and_windows_merge_as_one_stream() -> None:
    one, two = profiled(english, 500, seed=3), profiled(english, 500, seed=4)
    both = merged([one, two])
    assert both.requests == 1000 and both.sides["inputs"]["x"].count == 1000
    assert one.sides["inputs"]["x"].count == 500  # merging never changes its parts
    assert summary(both.sides["inputs"]["text"])["top"].keys() == {"hi there", "good day", "the cat sat"}


def test_too_few_values_are_said_not_guessed() -> None:
    base = profiled(english, MIN_COUNT * 2)
    thin = profiled(english, MIN_COUNT // 2)
    found, too_few = drift(base, thin)
    assert found == [] and set(too_few) == {"inputs.text", "inputs.x", "outputs.category", "outputs.score"}


def test_profiles_stay_bounded_whatever_the_payloads_hold() -> None:
    clock = Clock()
    profiler = Profiler(100, clock=clock)
    for i in range(2000):
        odd = {f"f{i % 500}": i, "n": [float("nan"), float("inf"), 1.5, True, None, "x" * 10_000, {"a": 1}][i % 7]}
        profiler.offer(odd, {"out": i})
    window = profiler.current
    assert window is not None and len(window.sides["inputs"]) == MAX_FIELDS and window.extra_fields > 0
    n = window.sides["inputs"]["n"]
    assert n.odd == 2 * 2000 // 7 + 1 and n.nulls > 0 and set(n.kinds) == {"number", "bool", "null", "string", "object"}
    assert (
        max(
            len(item[0])
            for item in n.items.get_frequent_items(profiles.sketches().frequent_items_error_type.NO_FALSE_NEGATIVES)
        )
        == MAX_ITEM_CHARS
    )
    for _ in range(KEEP_WINDOWS + 10):  # one request a window, for longer than the windows kept
        clock.now += WINDOW_SECONDS
        profiler.offer({"a": 1}, {"b": 2})
    assert len(profiler.closed) == KEEP_WINDOWS
    clock.now += WINDOW_SECONDS
    exported = profiler.export(0)
    assert len(exported["windows"]) == KEEP_WINDOWS and len(json.dumps(exported)) < 2_000_000
    assert profiler.export(exported["windows"][-1]["id"])["windows"] == []  # read once


def test_sampling_follows_the_percentage_and_zero_is_off() -> None:
    rng = random.Random(7)
    profiler = Profiler(5, rng=rng.random)
    for _ in range(20_000):
        profiler.offer({"a": 1}, {"b": 1})
    assert profiler.current is not None and 800 < profiler.current.requests < 1200
    off = Profiler(0)
    off.offer({"a": 1}, {"b": 1})
    assert off.current is None


def test_agreement_pairs_answers_by_request_id_per_field() -> None:
    from controlplane.monitoring.monitor import agreement

    primary = {f"r{i}": {"category": "a", "p": 0.5, "ok": True} for i in range(100)}
    shadow = {
        f"r{i}": {"category": "b" if i % 4 == 0 else "a", "p": 0.504 if i % 2 else 0.6, "ok": 1} for i in range(50, 150)
    }
    found = {a["field"]: a for a in agreement(shadow, [primary], ["m.v1"])}
    assert found["category"] == {"against": "m:v1", "field": "category", "pairs": 50, "agreement": 0.76}
    assert found["p"]["agreement"] == 0.5  # within 1%, or not
    assert found["ok"]["agreement"] == 0.0  # 1 is not True
    assert agreement(shadow, [{}], ["m.v1"]) == []
    # An ensemble member answers part of what its join does: only the fields both answered count.
    member = {f"r{i}": {"category": "b" if i % 5 == 0 else "a"} for i in range(100)}
    assert {a["field"] for a in agreement(member, [primary], ["j.v1"])} == {"category", "p", "ok"}
    (only,) = agreement(member, [primary], ["j.v1"], shared=True)
    assert (only["field"], only["pairs"], only["agreement"]) == ("category", 100, 0.8)


def test_a_stage_with_a_shadow_tells_both_to_keep_their_answers() -> None:
    from controlplane.translate.pipelines import translate
    from tests.helpers.translation import PIPELINE, RUNTIMES, routes, steady

    passing = [dataclasses.replace(r, passing=True) for r in RUNTIMES]
    snapshots = translate(steady(PIPELINE), passing)
    into_b = [r for r in routes(snapshots["ma-v1-1"], "egress") if r.match.path == "/pipelines/p/v1/b"]
    ingress_b = [r for r in routes(snapshots["mb-v1-2"], "ingress") if r.match.path == "/pipelines/p/v1/b"]
    added = [{a.header.key for a in r.request_headers_to_add} for r in ingress_b]
    assert added and all("x-mll-agree" in keys for keys in added)  # stage b has a shadow
    assert all("x-mll-agree" in r.request_headers_to_remove for r in into_b + ingress_b)  # never from a client
    ingress_a = [r for r in routes(snapshots["ma-v1-1"], "ingress") if r.match.path == "/pipelines/p/v1/a"]
    assert all("x-mll-agree" not in {a.header.key for a in r.request_headers_to_add} for r in ingress_a)


def test_the_runtime_answers_profiles_only_to_a_well_formed_query() -> None:
    from runtime_sdk.app import Runtime, answer_get

    def predict(payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    on = Runtime(predict, "m", "v1", profiler=Profiler(100))
    for query, status in [
        ("", 200),
        ("after=12", 200),
        ("after=-1", 400),
        ("after=x", 400),
        ("a=1", 400),
        ("after=" + "9" * 40, 400),
    ]:
        page = answer_get(on, "/profiles", query)
        assert page is not None and page.status == status, (query, page)
    off = answer_get(Runtime(predict, "m", "v1"), "/profiles", "")
    assert off is not None and off.status == 404 and b"--profile-percent 0" in off.body


def test_the_monitoring_page_draws_now_against_the_baseline_and_escapes_field_names() -> None:
    from controlplane.monitoring.monitor import Baseline, Monitor, VersionState
    from controlplane.web.monitoring import monitoring_page

    def hostile(rng: random.Random, i: int) -> tuple[dict[str, Any], dict[str, Any]]:
        request, answer = english(rng, i)
        return {**request, "<script>x</script>": rng.random()}, answer

    clock = Clock()
    monitor = Monitor(None, "p/", lambda: [], clock=clock)  # type: ignore[arg-type]
    wid = int(clock.now // WINDOW_SECONDS)
    monitor.versions[("m", "v1")] = state = VersionState()
    state.add(wid, profiled(hostile, seed=5))
    monitor.baselines[("m", "v1")] = Baseline(profiled(hostile, seed=6), 0.2, "2026-12-06T10:00:00Z", 300, 1000)
    monitor._judge()
    html = monitoring_page(monitor.page())
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert html.count("class='distribution'") >= 4 and "data-series='baseline'" in html and "m:v1" in html
    assert "drift (PSI) per field" in html and html.count('class="field stable"') >= 4
    marked = monitoring_page(monitor.page(), {"m.v1": [(time.time() - 30, "p v2 <b>apply</b>")]})
    assert "class='mark'" in marked and "p v2 &lt;b&gt;apply&lt;/b&gt;" in marked  # when its pipeline changed


def test_a_candidates_answers_are_compared_with_its_baselines_field_by_field() -> None:
    from controlplane.monitoring.monitor import Monitor, VersionState

    def flips(rng: random.Random, i: int) -> tuple[dict[str, Any], dict[str, Any]]:
        request, answer = english(rng, i)
        return request, {**answer, "category": "c" if i % 2 else answer["category"]}

    clock = Clock()
    monitor = Monitor(None, "p/", lambda: [], clock=clock)  # type: ignore[arg-type]
    wid = int(clock.now // WINDOW_SECONDS)
    for version, make, seed in ((("m", "v1"), english, 1), (("m", "v2"), english, 2), (("m", "v3"), flips, 3)):
        monitor.versions[version] = state = VersionState()
        state.add(wid, profiled(make, seed=seed))
    same = monitor.output_drift("m.v2", frozenset({"m.v1"}))
    moved = monitor.output_drift("m.v3", frozenset({"m.v1"}))
    assert same is not None and same[1] < 0.1
    assert moved is not None and moved[0] == "category" and moved[1] > 1
    assert monitor.output_drift("m.v9", frozenset({"m.v1"})) is None  # nothing profiled: not judged


def test_reference_data_profiles_as_the_runtime_would_and_a_bad_line_is_named() -> None:
    rng = random.Random(5)
    lines = []
    for i in range(1000):
        request, answer = english(rng, i)
        lines.append(json.dumps({"request": request, "answer": answer} if i % 2 else request))
    base = read_profile(profile_window("\n".join(lines) + "\n\n"))
    assert base.requests == 1000 and base.sides["inputs"]["x"].count == 1000
    assert base.sides["outputs"]["category"].count == 500  # answers where the sample has them
    found, too_few = drift(base, profiled(english, seed=6))
    assert too_few == [] and all(d.psi < 0.1 for d in found), found

    records, problems = read_records('{"x": 1}\n[1, 2]\nnot json\n{"request": 3}\n' + "{}" * 40_000 + "\n")
    assert len(records) == 1
    assert [p.split(":")[0] for p in problems] == [f"reference line {n}" for n in (2, 3, 4, 5)], problems
    assert "over 65,536" in problems[3]
    assert read_records("\n \n") == ([], ["reference: no records"])
    assert len(read_records("x\n" * 50)[1]) == SHOWN + 1  # the first ten named, the rest counted
    with pytest.raises(BadReference, match="reference line 1: not JSON"):
        profile_window("{\n")


def test_runtimes_on_other_hosts_are_read_through_their_ingress_under_mtls_only() -> None:
    from contract.service import RuntimeService
    from controlplane.monitoring.runtimes import runtime_url

    here = RuntimeService("m-1", "m", "v1", "127.0.0.1", 9002, "", 9001, 9003, "")
    there = dataclasses.replace(here, host="10.0.0.2", tls_dir="/run/m-1/tls")
    assert runtime_url(here, secure=False) == "http://127.0.0.1:9002/profiles"
    assert runtime_url(there, secure=True) == "https://10.0.0.2:9001/profiles"
    assert runtime_url(there, secure=False) == ""  # nothing beyond loopback without authentication
    v6 = dataclasses.replace(there, host="fd00::2")
    assert runtime_url(v6, secure=True) == "https://[fd00::2]:9001/profiles"


async def test_a_runtimes_answer_is_read_whole_however_many_packets_it_takes() -> None:
    """The windows of a busy runtime run to hundreds of KB: read to their end (bounded), not to the first packet."""
    from aiohttp import test_utils, web

    from controlplane.monitoring.runtimes import read_at_most

    big = b"x" * 3_000_000

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=big)

    app = web.Application()
    app.router.add_get("/", answer)
    async with test_utils.TestClient(test_utils.TestServer(app)) as client:
        async with client.get("/") as resp:
            assert await read_at_most(resp, 4_000_000) == big
        async with client.get("/") as resp:
            with pytest.raises(ValueError, match="over 1000000 bytes"):
                await read_at_most(resp, 1_000_000)


async def test_a_baseline_too_thin_to_judge_drift_on_is_refused_with_what_to_do() -> None:
    from controlplane.monitoring.monitor import Monitor, MonitorError, VersionState

    clock = Clock()
    monitor = Monitor(None, "p/", lambda: [], clock=clock)  # type: ignore[arg-type]
    monitor.versions[("m", "v1")] = state = VersionState()
    state.add(int(clock.now // WINDOW_SECONDS), profiled(english, MIN_COUNT - 1))
    clock.now += WINDOW_SECONDS
    with pytest.raises(
        MonitorError, match=f"only {MIN_COUNT - 1} profiled requests of m:v1 .* at least 50 \\(a longer --window"
    ):
        await monitor.set_baseline("m", "v1", 60, 0.2)
    assert monitor.baselines == {}  # nothing kept
