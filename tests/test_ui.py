"""The dashboard that changes pipelines: its forms as pure functions, then every change and every refusal
through a real control plane process (its admin API, Envoy's validation, Consul KV)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import yaml

from controlplane.pipeline.model import InvalidPipeline
from controlplane.pipeline.spec import parse_pipeline, pipeline_to_dict
from controlplane.web.auth import FAILED_SIGN_INS, SESSION_SECONDS, SESSIONS_KEPT, Sessions
from controlplane.web.forms import edited, form_problems, groups, problems_from_details
from controlplane.web.manage import _local
from tests.helpers.forms import Forms

EXAMPLE = Path(__file__).parent / "data" / "three-stage.yaml"
CLASSIFY = "stages[1].variants"


def example() -> dict[str, Any]:
    return pipeline_to_dict(parse_pipeline(yaml.safe_load(EXAMPLE.read_text())))


def test_a_form_edits_weights_shadows_and_transport_and_nothing_else() -> None:
    doc = example()
    form = {
        f"{CLASSIFY}[0].weight": "75",
        f"{CLASSIFY}[1].weight": "25",
        "transport": "uds",
        "stages[1].shadow.model": "classifier",
        "stages[1].shadow.version": "v3",
        "stages[1].shadow.percent": "12.5",
        "stages[0].shadow.model": "tokenize",
        "stages[0].shadow.version": "v2",
        "stages[0].shadow.percent": "1",
        "stages[2].shadow.model": "",
        "stages[2].shadow.version": "",
        "stages[2].shadow.percent": "",
        "name": "renamed",
        "stages[1].timeout_ms": "1",
        "csrf": "x",  # not editable here: ignored
    }
    new = parse_pipeline(edited(doc, form))
    assert [v.weight for v in new.stages[1].variants] == [75, 25]
    assert new.transport == "uds" and new.name == "nlp" and new.stages[1].timeout_ms == 2000
    assert new.stages[1].shadow is not None and new.stages[1].shadow.percent == 12.5
    assert new.stages[0].shadow is not None and new.stages[0].shadow.version == "v2"
    assert new.stages[2].shadow is None
    removed = parse_pipeline(edited(doc, {"stages[1].shadow.model": "x", "stages[1].shadow.remove": "on"}))
    assert removed.stages[1].shadow is None
    assert parse_pipeline(edited(doc, {})) == parse_pipeline(doc)  # a form that names nothing changes nothing
    assert [g.path for g in groups(doc)] == [
        "stages[0].variants",
        CLASSIFY,
        "stages[2].branches[0].variants",
        "stages[2].branches[1].variants",
    ]


def test_what_is_not_a_number_is_reported_at_its_field() -> None:
    doc = example()
    for value, path in (
        ("ten", f"{CLASSIFY}[0].weight"),
        ("-1", f"{CLASSIFY}[0].weight"),
        ("1e9", f"{CLASSIFY}[0].weight"),
    ):
        with pytest.raises(InvalidPipeline) as err:
            parse_pipeline(edited(doc, {path: value}))
        assert [p.path for p in err.value.problems] == [path], (value, err.value.problems)
    with pytest.raises(InvalidPipeline) as err:
        parse_pipeline(edited(doc, {f"{CLASSIFY}[0].weight": "0", f"{CLASSIFY}[1].weight": "0"}))
    assert [p.path for p in err.value.problems] == [CLASSIFY]  # the group's fieldset shows it
    with pytest.raises(InvalidPipeline) as err:
        parse_pipeline(
            edited(
                doc,
                {
                    "stages[1].shadow.model": "classifier",
                    "stages[1].shadow.version": "v3",
                    "stages[1].shadow.percent": "lots",
                },
            )
        )
    assert [p.path for p in err.value.problems] == ["stages[1].shadow.percent"]
    back = problems_from_details(str(InvalidPipeline(err.value.problems)))
    assert [(p.path, p.message) for p in back] == [(p.path, p.message) for p in err.value.problems]


def test_a_form_adds_a_variant_at_its_share_removes_one_and_starts_a_rollout() -> None:
    """The seed's second scenario as a form: politics gets mlp-politics:v2 at 10%, the rest keeps its proportions."""
    doc = example()
    politics = "stages[2].branches[1].variants"
    new = parse_pipeline(edited(doc, {f"{politics}.add": "mlp-politics:v2", f"{politics}.add_share": "10"}))
    assert [(v.version, v.weight) for v in new.stages[2].branches[1].variants] == [("v1", 90), ("v2", 10)]
    three = parse_pipeline(edited(doc, {f"{CLASSIFY}.add": "classifier:v3", f"{CLASSIFY}.add_share": "50"}))
    assert [v.weight for v in three.stages[1].variants] == [45, 5, 50]  # 90:10 kept in the other half
    both = {f"{CLASSIFY}[0].remove": "on", f"{CLASSIFY}.add": "classifier:v3", f"{CLASSIFY}.add_share": "20"}
    swapped = parse_pipeline(edited(doc, both))  # removed first (indexes are the page's), then added
    assert [(v.version, v.weight) for v in swapped.stages[1].variants] == [("v2", 80), ("v3", 20)]
    started = parse_pipeline(
        edited(doc, {"stages[1].rollout.start": "classifier:v3", "stages[1].rollout.steps": "10, 100"})
    )
    assert started.stages[1].rollout is not None and started.stages[1].rollout.steps == (10, 100)
    assert started.stages[1].rollout.candidate.version == "v3"
    # What cannot be done is reported at its field and changes nothing.
    hostile = {
        f"{CLASSIFY}.add": "classifier:v1",  # in the group already
        f"{politics}.add": "mlp-politics:v2",
        f"{politics}.add_share": "100",  # the whole group: not a share
        "stages[2].branches[0].variants.add": "no-colon\nhere",
        "stages[1].rollout.start": "classifier:v3",
        "stages[1].rollout.steps": "10, lots",
        "stages[0].variants[0].remove": "on",  # its only variant
    }
    assert sorted((p.path, p.message.split(",")[0]) for p in form_problems(doc, hostile)) == [
        ("stages[0].variants[0].remove", "a group keeps at least one variant"),
        ("stages[1].rollout.steps", "percents from 1 to 100 separated by commas"),
        ("stages[1].variants.add", "classifier:v1 is in this group already: change its weight"),
        ("stages[2].branches[0].variants.add", "pick a model version as MODEL:VERSION"),
        ("stages[2].branches[1].variants.add_share", "a share in percent from 1 to 99"),
    ]
    assert parse_pipeline(edited(doc, hostile)) == parse_pipeline(doc)


def test_the_change_page_offers_passing_versions_not_in_the_group_own_model_first() -> None:
    from controlplane.pipeline.model import PipelineVersion
    from controlplane.web.pages import edit_page

    doc = example()
    current = PipelineVersion(parse_pipeline(doc), 1, "2026-01-01T00:00:00Z", "apply")
    passing = ["aaa:v1", "classifier:v1", "classifier:v3", "mlp-politics:v2"]
    html = edit_page(current, doc, [], "csrf", candidates=passing)
    offered = re.findall(r"<select name='stages\[1\]\.variants\.add'>(.*?)</select>", html)[0]
    assert re.findall(r"<option>([^<]+)</option>", offered) == ["classifier:v3", "aaa:v1", "mlp-politics:v2"]
    assert "name='stages[1].variants.add_share'" in html and "name='stages[1].variants[0].remove'" in html
    assert "name='stages[1].rollout.start'" in html and "name='stages[2].branches[0].rollout.start'" in html
    assert "<button class='primary' name='action' value='review' id='review'>" in html  # review first, never apply
    assert "no other model version" in edit_page(current, doc, [], "csrf", candidates=[])


def test_sessions_are_bounded_expire_and_wrong_tokens_are_throttled() -> None:
    now = [0.0]
    sessions = Sessions("s3cret", clock=lambda: now[0])
    first = sessions.sign_in("s3cret", "ada", "127.0.0.1")
    assert first is not None and sessions.find(first.sid) == first and first.who == "ada from 127.0.0.1"
    for _ in range(SESSIONS_KEPT):
        assert sessions.sign_in("s3cret", "", "127.0.0.1") is not None
    assert len(sessions.by_sid) == SESSIONS_KEPT and sessions.find(first.sid) is None  # the oldest went
    last = list(sessions.by_sid)[-1]
    now[0] += SESSION_SECONDS + 1
    assert sessions.find(last) is None
    for _ in range(FAILED_SIGN_INS):
        assert not sessions.throttled() and sessions.sign_in("s3cre", "", "x") is None
    assert sessions.throttled()
    now[0] += 61
    assert not sessions.throttled()


def test_redirects_stay_on_the_dashboard() -> None:
    assert _local("/pipelines/nlp/edit") == "/pipelines/nlp/edit"
    hostile_ones = (
        "//evil.example/x",
        "https://evil.example",
        "/\\evil.example",
        "javascript:alert(1)",
        "/a\r\nSet-Cookie: x",
    )
    for hostile in hostile_ones:
        assert _local(hostile) == "/"


def next_of(response: aiohttp.ClientResponse) -> str:
    """Where the sign-in page sends the browser back to, decoded."""
    return parse_qs(urlsplit(response.headers["Location"]).query)["next"][0]


def history(control_plane: Any) -> list[tuple[int, str]]:
    out = yaml.safe_load(control_plane.cli("history", "pipeline", "nlp", "-o", "yaml").stdout)
    return [(int(h["version"]), h["cause"]) for h in out["items"]]


async def test_the_dashboard_changes_pipelines_only_through_the_admin_api(control_plane: Any) -> None:
    assert "created (version 1)" in control_plane.cli("apply", "-f", str(EXAMPLE)).stdout
    dry = control_plane.cli("apply", "-f", str(EXAMPLE), "--dry-run")
    assert "pipeline/nlp valid, unchanged (server dry run" in dry.stdout, dry.stderr
    base = f"http://127.0.0.1:{control_plane.metrics_port}"
    edit = "/pipelines/nlp/edit"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        # Signed out: the form is not served, a forged post changes nothing.
        async with browser.get(base + edit, allow_redirects=False) as r:
            assert r.status == 303 and next_of(r) == edit
        async with browser.get(base + "/pipelines/a%0D%0ASet-Cookie:%20x=1/edit", allow_redirects=False) as r:
            assert r.status == 303 and "x" not in r.cookies  # a name with a newline stays inside the URL
            assert "\n" not in r.headers["Location"] and next_of(r) == "/pipelines/a\r\nSet-Cookie: x=1/edit"
        async with browser.post(base + edit, data={f"{CLASSIFY}[0].weight": "1", "csrf": ""}) as r:
            assert r.status == 403 and "sign in first" in await r.text()
        async with browser.get(base + "/login?token=wrong") as r:
            assert r.status == 401 and "wrong token" in await r.text()
        async with browser.post(base + "/login", data={"token": control_plane.ui_token, "name": "ada"}) as r:
            assert r.status == 200 and str(r.url) == base + "/"  # followed the redirect, signed in
        for path in ("/", "/pipelines/nlp", "/runtimes", "/monitoring", "/models", "/yaml"):
            async with browser.get(base + path) as r:  # every page's bar: signed in, a sign-out that works
                assert r.status == 200 and "/logout" in Forms(text := await r.text()).actions(), (path, text[:300])
                assert Forms(text).find("/logout")["csrf"], path
        async with browser.get(base + edit) as r:
            page = Forms(await r.text())
        form = page.find(edit)
        assert form[f"{CLASSIFY}[0].weight"] == "90" and form["transport"] == "http" and form["expect_version"] == "1"

        # Signed in, but the CSRF value or the origin is not the page's: refused.
        async with browser.post(base + edit, data={**form, "csrf": "guess"}) as r:
            assert r.status == 403 and "CSRF" in await r.text()
        async with browser.post(base + edit, data=form, headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 403
        async with browser.post(base + edit, data=form, headers={"Host": "evil.example"}) as r:
            assert r.status == 421
        # A field posted as a file (multipart), the CSRF value right: refused as a whole, not read as text.
        upload = aiohttp.FormData({k: v for k, v in form.items() if k != f"{CLASSIFY}[0].weight"} | {"action": "apply"})
        upload.add_field(f"{CLASSIFY}[0].weight", b"60", filename="weight.txt")
        async with browser.post(base + edit, data=upload) as r:
            assert r.status == 400 and "not text" in await r.text()
        assert history(control_plane) == [(1, "apply")]

        # An invalid edit: the field's own error next to it, the typed value kept, nothing written.
        async with browser.post(base + edit, data={**form, f"{CLASSIFY}[0].weight": "ninety"}) as r:
            text = await r.text()
        assert r.status == 400
        assert re.search(
            rf"value='ninety'> <output></output><span class='error' data-for='{re.escape(CLASSIFY)}\[0\]\.weight'>",
            text,
        )
        async with browser.post(base + edit, data={**form, "transport": "kafka"}) as r:
            assert r.status == 400 and "needs a Kafka broker" in await r.text()  # the admin API's own answer
        assert history(control_plane) == [(1, "apply")]

        # A real edit, reviewed first: the diff and Envoy's check, nothing written; then applied from the review
        # as a new version with the cause `ui by ada`, the weights as typed.
        weights = {f"{CLASSIFY}[0].weight": "60", f"{CLASSIFY}[1].weight": "40", "stages[1].shadow.percent": "20"}
        async with browser.post(base + edit, data={**form, **weights}) as r:
            review = await r.text()
        assert r.status == 200 and "Envoy accepts it: applying makes version 2" in review
        assert (
            "<span class='del'>-    weight: 90</span>" in review
            and "<span class='add'>+    weight: 60</span>" in review
        )
        assert history(control_plane) == [(1, "apply")]
        confirm = Forms(review).find(edit)
        assert confirm[f"{CLASSIFY}[0].weight"] == "60" and confirm["expect_version"] == "1"  # carried on
        async with browser.post(base + edit, data={**confirm, "action": "apply"}) as r:
            assert r.status == 200 and "version 2 created" in await r.text()
        assert history(control_plane) == [(1, "apply"), (2, "ui by ada")]
        got = yaml.safe_load(control_plane.cli("get", "pipeline", "nlp", "-o", "yaml").stdout)
        assert [v["weight"] for v in got["spec"]["stages"][1]["variants"]] == [60, 40]
        assert got["spec"]["stages"][1]["shadow"]["percent"] == 20
        # The form posted again, judged on version 1: refused, not overwritten.
        async with browser.post(base + edit, data={**form, f"{CLASSIFY}[0].weight": "1", "action": "apply"}) as r:
            assert r.status == 400 and "not at version 1" in await r.text()

        async with browser.get(f"{base}/pipelines/nlp/diff?from=1&to=2") as r:
            diff = await r.text()
        assert "<span class='del'>-    weight: 90</span>" in diff and "<span class='add'>+    weight: 60</span>" in diff

        # Roll back from the history table.
        async with browser.get(base + edit) as r:
            back = Forms(await r.text()).find("/pipelines/nlp/rollback")
        assert back["to_version"] == "1"
        async with browser.post(base + "/pipelines/nlp/rollback", data=back) as r:
            assert r.status == 200 and "version 3 created" in await r.text()
        assert history(control_plane)[-1] == (3, "rollback to v1 (ui by ada)")

        # The YAML editor: validate writes nothing, a parse error names its line, apply writes.
        async with browser.get(base + "/yaml?name=nlp") as r:
            yaml_form = Forms(await r.text()).find("/yaml")
        text = EXAMPLE.read_text().replace("weight: 10", "weight: 30")
        async with browser.post(base + "/yaml", data={**yaml_form, "text": text, "action": "validate"}) as r:
            assert r.status == 200 and "valid: pipeline nlp would make a new version" in await r.text()
        async with browser.post(base + "/yaml", data={**yaml_form, "text": "stages: [\n", "action": "validate"}) as r:
            assert r.status == 400 and "line 2" in await r.text()
        async with browser.post(base + "/yaml", data={**yaml_form, "text": "x" * 300_000, "action": "apply"}) as r:
            assert r.status == 400
        assert history(control_plane)[-1][0] == 3
        async with browser.post(base + "/yaml", data={**yaml_form, "text": text, "action": "apply"}) as r:
            assert r.status == 200 and "version 4 created" in await r.text()
        assert history(control_plane)[-1] == (4, "ui by ada")

        # A rollout's buttons: resume a paused one (the same move as `mllambda rollout resume`).
        rollout = "    rollout: {candidate: {model: classifier, version: v3}, steps: [10, 100], paused: true}\n"
        paused = text.replace("    shadow: {model: classifier", rollout + "    shadow: {model: classifier")
        async with browser.post(base + "/yaml", data={**yaml_form, "text": paused, "action": "apply"}) as r:
            assert r.status == 200 and "version 5 created" in await r.text()
        async with browser.get(base + edit) as r:
            steer = Forms(await r.text()).find("/pipelines/nlp/rollout")
        async with browser.post(base + "/pipelines/nlp/rollout", data={**steer, "action": "resume"}) as r:
            assert r.status == 200 and r.url.query == {"version": "6", "created": "True"}  # the driver may move next
        async with browser.post(base + "/pipelines/nlp/rollout", data={**steer, "action": "explode"}) as r:
            assert r.status == 400
        assert (6, "rollout nlp/classify classifier:v3 resumed (ui by ada)") in history(control_plane)

        async with browser.get(base + "/runtimes") as r:
            assert r.status == 200 and "<table id='runtimes'>" in await r.text()
        async with browser.get(base + edit) as r:
            csrf = Forms(await r.text()).find("/logout")["csrf"]
        async with browser.post(base + "/logout", data={"csrf": csrf}) as r:
            assert r.status == 200
        async with browser.post(base + edit, data=form) as r:
            assert r.status == 403
    assert history(control_plane)[-1][0] >= 6  # the rollout driver may have moved on since
