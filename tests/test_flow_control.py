"""Flow control through the real stack: a model saturated by two pipelines and two callers, what each one gets."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.node.processes import http_get
from tests.conftest import passing
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
    await asyncio.sleep(seconds)
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
    apply(control_plane, tmp_path, two_stages("shared", fairness={"header": "x-tenant"}))
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

    # One tenant sends six at a time, another one: six places (2 + 4 waiting), a share of three each.
    heavy, light = Tally(), Tally()
    await loaded(*[(heavy, f"{base}/shared", 100, {"x-tenant": "heavy"})] * 6, (light, f"{base}/shared", 100,
                                                                                 {"x-tenant": "light"}))  # fmt: skip
    assert heavy.codes[429] > 0 and heavy.codes[200] > 0, heavy.codes
    for status, took, body, retry_after in heavy.refusals:
        assert status == 429 and took < 0.3 and retry_after == "1", (status, took, body)
        # refused at the door, or (holding more while light was away) giving a waiting place up to light
        over = (
            r"caller 'heavy' (holds [3-6] of the 6 places, its fair share is 3|is over its fair share \([4-6] places)"
        )
        assert re.search(over, body["error"]), body
    # light is never refused, and its one worker gets more answers than each of heavy's six: it never waits
    # behind heavy's backlog (a freed place goes to the caller with the fewest in predict)
    assert set(light.codes) == {200} and light.codes[200] > heavy.codes[200] / 6, (light.codes, heavy.codes)

    # A client cannot name its own priority or caller: the gateway sets both.
    forged = Tally()
    await loaded(*[(gold, f"{base}/gold", 100, None)] * 3,
                 *[(forged, f"{base}/bulk", 100, {"x-mll-priority": "critical", "x-mll-caller": "light"})] * 2,
                 seconds=1.5)  # fmt: skip
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
