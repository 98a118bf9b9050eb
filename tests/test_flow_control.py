"""Flow control through the real stack: a model saturated by two pipelines and two callers, what each one gets."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.node.processes import http_get
from tests.helpers.components import passing
from tests.helpers.envoy import admin_stat, wait_for
from tests.helpers.observe import metric, scrape
from tests.helpers.pipelines import apply, service_meta, until_ok

pytestmark = pytest.mark.slow


def two_stages(name: str, **admission: Any) -> dict[str, Any]:
    """echo -> paced: the refusal of the second stage travels back through the first one's runtime."""
    stages = [{"name": m, "variants": [{"model": m, "version": "v1"}]} for m in ("echo", "paced")]
    return {"name": name, "stages": stages, **admission}


class Tally:
    def __init__(self) -> None:
        self.codes: Counter[int] = Counter()
        self.refusals: list[tuple[int, float, dict[str, Any], str]] = []  # status, seconds, body, retry-after

    async def run(self, url: str, stop: asyncio.Event, ms: int, headers: dict[str, str] | None = None) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            while not stop.is_set():
                started = time.monotonic()
                async with http.post(url, json={"ms": ms}, headers=headers or {}) as resp:
                    body = await resp.json(content_type=None)
                    self.codes[resp.status] += 1
                    if resp.status != 200:
                        took = time.monotonic() - started
                        self.refusals.append((resp.status, took, body, resp.headers.get("retry-after", "")))
                        await asyncio.sleep(0.05)


async def loaded(*workers: tuple[Tally, str, int, dict[str, str] | None], seconds: float = 3) -> None:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(t.run(url, stop, ms, headers)) for t, url, ms, headers in workers]
    await asyncio.sleep(seconds)  # load duration
    stop.set()
    await asyncio.gather(*tasks)


async def test_a_saturated_model_serves_the_critical_pipeline_sheds_the_sheddable_and_keeps_callers_to_their_share(
    control_plane: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    _, paced = passing(
        start_runtime("examples.trivial.models:echo", "echo", "v1", wait=False),
        start_runtime(
            "examples.trivial.models:paced", "paced", "v1", wait=False, extra=("--max-in-flight=2", "--queue=4")
        ),
    )
    apply(control_plane, tmp_path, two_stages("gold", priority="critical"))
    apply(control_plane, tmp_path, two_stages("bulk", priority="sheddable"))
    apply(control_plane, tmp_path, two_stages("shared", fairness={"header": "x-tenant", "shares": {"heavy": 2}}))
    base = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines"
    for name in ("gold", "bulk", "shared"):
        await until_ok(f"{base}/{name}", {"ms": 0})

    # Two callers of the critical pipeline keep both places in predict busy; the sheddable one's are refused.
    gold, bulk = Tally(), Tally()
    await loaded(*[(gold, f"{base}/gold", 100, None)] * 3, *[(bulk, f"{base}/bulk", 100, None)] * 2)
    assert set(gold.codes) == {200} and gold.codes[200] > 40, gold.codes  # ~2 places x 10/s x 3 s
    assert bulk.codes[503] > 3 * bulk.codes[200], bulk.codes
    for status, took, body, retry_after in bulk.refusals:
        assert status == 503 and took < 0.3 and retry_after == "1", (status, took, retry_after)
        assert body["refused"] == "shed" and "sheddable requests are refused first" in body["error"], body

    # One tenant sends six at a time, another one: six places (2 + 4 waiting); heavy weighs 2 (the gateway
    # says so to every stage for that key alone), so four are its share and two light's.
    heavy, light = Tally(), Tally()
    await loaded(
        *[(heavy, f"{base}/shared", 100, {"x-tenant": "heavy"})] * 6,
        (light, f"{base}/shared", 100, {"x-tenant": "light"}),
    )
    assert heavy.codes[429] > 0 and heavy.codes[200] > 0, heavy.codes
    for status, took, body, retry_after in heavy.refusals:
        assert status == 429 and took < 0.3 and retry_after == "1", (status, took, body)
        # refused at the door, or (holding more while light was away) giving a waiting place up to light
        over = (
            r"caller 'heavy' (holds [4-6] of the 6 places, its fair share is 4, weight 2"
            r"|is over its fair share \([5-6] places, its share is 4\))"
        )
        assert re.search(over, body["error"]), body
    # light is never refused, and its one worker gets more answers than each of heavy's six: it never waits
    # behind heavy's backlog (a freed place goes to the caller with the fewest in predict)
    assert set(light.codes) == {200} and light.codes[200] > heavy.codes[200] / 6, (light.codes, heavy.codes)

    # A client cannot name its own priority, caller or weight: the gateway sets them.
    forged = Tally()
    claims = {"x-mll-priority": "critical", "x-mll-caller": "light", "x-mll-share": "100"}
    await loaded(*[(gold, f"{base}/gold", 100, None)] * 3, *[(forged, f"{base}/bulk", 100, claims)] * 2, seconds=1.5)
    assert forged.codes[503] > 0 and all(r[2]["refused"] == "shed" for r in forged.refusals), forged.codes

    # What was refused is counted: per variant on the control plane (a model version's cluster, so each pipeline
    # that shares it shows its total), per priority and outcome at the runtime.
    plane = scrape(control_plane)
    refused = bulk.codes[503] + heavy.codes[429] + forged.codes[503]
    assert metric(plane, "mllambda_variant_refused_total", pipeline="bulk", model="paced") >= refused, plane
    shown = control_plane.cli("status", f"--dashboard=http://127.0.0.1:{control_plane.metrics_port}").stdout
    row = re.search(r"^bulk\s+\S+\s+paced:v1\s+[\d.]+%\s+\S+\s+(\d+)\s+(\d+)\s+(\d+)", shown, re.MULTILINE)
    assert row and int(row.group(3)) > 0, shown  # `mllambda status`: the pipeline's refusals, in a column
    port = service_meta(control_plane.consul_port, "paced", paced.service_id)["runtime_port"]
    runtime = http_get(f"http://127.0.0.1:{port}/metrics")[1]
    admission = "mllambda_runtime_admission_total"
    assert metric(runtime, admission, priority="sheddable", outcome="shed") >= bulk.codes[503] + forged.codes[503]
    assert metric(runtime, admission, priority="standard", outcome="over share") >= heavy.codes[429]
    assert metric(runtime, admission, priority="critical", outcome="admitted") >= gold.codes[200]

    # ... and per caller key, read from the runtimes by the control plane: `mllambda status` and the dashboard
    # show heavy's refusals (over share) beside light's none, for the model version they share
    dashboard = f"--dashboard=http://127.0.0.1:{control_plane.metrics_port}"

    def callers() -> dict[str, dict[str, Any]]:
        done = control_plane.cli("status", dashboard, "-o", "json")
        rows = json.loads(done.stdout)["admission_by_caller"] if done.returncode == 0 else []
        return {r["caller"]: r for r in rows if r["model"] == "paced"}

    def caught_up(seen: dict[str, dict[str, Any]]) -> bool:  # the book reads every 5 s: one read may predate the end
        heavy_seen = seen.get("heavy", {})
        return bool(
            heavy_seen.get("refused", {}).get("over share", 0) >= heavy.codes[429]
            and heavy_seen.get("admitted", 0) >= heavy.codes[200]
            and seen.get("light", {}).get("admitted", 0) >= light.codes[200]
        )

    await wait_for(lambda: caught_up(callers()))
    seen = callers()
    assert seen["light"]["refused"] == {} and seen["light"]["admitted"] >= light.codes[200], seen
    assert seen["heavy"]["admitted"] >= heavy.codes[200], seen
    table = control_plane.cli("status", dashboard).stdout
    assert re.search(r"^paced:v1\s+heavy\s+\d+\s+\d+ over share", table, re.MULTILINE), table
    page = http_get(f"http://127.0.0.1:{control_plane.metrics_port}/")[1]
    assert "Admission by caller" in page and "<td class='caller'>heavy</td>" in page, page[-3000:]


async def test_a_rate_limit_refuses_a_caller_over_its_quota_at_the_gateway_and_no_stage_sees_those_requests(
    control_plane: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    """`rate_limit: {per_second: 1, burst: 3, keys: 2}` with `fairness: {header: x-tenant}`: each tenant gets three
    at once and one a second after, the client's address stands for a request without the header, at most two
    callers are tracked, the refused get 429 at once with the reason, and the runtime never sees them."""
    (echo,) = passing(start_runtime("examples.trivial.models:echo", "echo", "v1", wait=False))
    quota = {"per_second": 1, "burst": 3, "keys": 2}
    spec = {
        "name": "quota",
        "fairness": {"header": "x-tenant", "shares": {"gold": 2}},
        "rate_limit": quota,
        "stages": [{"name": "echo", "variants": [{"model": "echo", "version": "v1"}]}],
    }
    apply(control_plane, tmp_path, spec)
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/quota"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

        async def burst(count: int, tenant: str | None) -> list[tuple[int, float, dict[str, Any], Any]]:
            """`count` requests one after another, as fast as the answers come."""
            found = []
            for _ in range(count):
                started = time.monotonic()
                headers = {"x-tenant": tenant} if tenant else {}
                async with http.post(url, json={"n": 1}, headers=headers) as resp:
                    body = await resp.json(content_type=None)
                    found.append((resp.status, time.monotonic() - started, body, resp.headers))
            return found

        async def answered() -> bool:  # the route is there (a caller of its own: the others' buckets stay full)
            return (await burst(1, "warm-up"))[0][0] == 200

        await wait_for(answered, timeout=20)
        a = await burst(5, "a")
        assert [status for status, *_ in a] == [200, 200, 200, 429, 429], a
        for _, took, body, headers in a[3:]:
            assert took < 0.3 and headers["retry-after"] == "1", (took, headers)
            assert headers["x-mll-rate-limit"] == "1/s, burst 3, per x-tenant", headers
            assert body["refused"] == "rate limited" and "over the pipeline's rate limit" in body["error"], body
        # A weighed key has its weight times the quota (its own route at the gateway): gold weighs 2.
        gold = await burst(8, "gold")
        assert [status for status, *_ in gold] == [200] * 6 + [429] * 2, gold
        assert gold[-1][3]["x-mll-rate-limit"] == "2/s, burst 6, per x-tenant", gold[-1][3]
        # Two callers are tracked at most: b and c push a out, and a comes back with a full bucket at once
        # (which, kept, would have been empty for another second).
        b, c, a_again = await burst(1, "b"), await burst(1, "c"), await burst(1, "a")
        assert [r[0] for r in (*b, *c, *a_again)] == [200, 200, 200], (b, c, a_again)
        # Without the header, the client's address is the caller.
        anonymous = await burst(5, None)
        assert [status for status, *_ in anonymous] == [200, 200, 200, 429, 429], anonymous

        refused = sum(status == 429 for status, *_ in [*a, *gold, *anonymous])
        served = sum(status == 200 for status, *_ in [*a, *gold, *b, *c, *a_again, *anonymous])
        stat = "rate_limit.quota.http_local_rate_limit.rate_limited"
        assert admin_stat(control_plane.gateway_admin_port, stat) == refused  # the gateway counts them per pipeline
        port = service_meta(control_plane.consul_port, "echo", echo.service_id)["runtime_port"]
        runtime = http_get(f"http://127.0.0.1:{port}/metrics")[1]
        seen = metric(runtime, "mllambda_runtime_requests_total", model="echo", code="200")
        assert seen == served + 1, (seen, served)  # the refused never reached the stage (+1: the warm-up)

        def shown() -> bool:  # `mllambda status`, the metrics and the page, from the next reading (5 s)
            dashboard = f"--dashboard=http://127.0.0.1:{control_plane.metrics_port}"
            line = f"rate limit 1/s: {refused} refused at the gateway"
            counted = metric(scrape(control_plane), "mllambda_pipeline_rate_limited_total", pipeline="quota")
            page = scrape(control_plane, "/pipelines/quota")  # and the pipeline's page
            said = f"rate limit 1/s, burst 3, per x-tenant: {refused} refused at the gateway; weighed: gold \u00d72"
            shown_there = said in page
            return line in control_plane.cli("status", dashboard).stdout and counted == refused and shown_there

        await wait_for(lambda: asyncio.to_thread(shown), timeout=20)

        # The quota is configuration: a new version without it lets the same burst through.
        apply(control_plane, tmp_path, {k: v for k, v in spec.items() if k != "rate_limit"})

        async def unlimited() -> bool:
            return all(status == 200 for status, *_ in await burst(6, "a"))

        await wait_for(unlimited, timeout=20)
