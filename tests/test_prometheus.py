"""deploy/prometheus: a real Prometheus finds the control plane, the gateway, runtimes and sidecars
through Consul and computes the recording rules from what they export."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from controlplane.config import PROJECT_ROOT
from controlplane.node.processes import ManagedProcess, free_port, http_get
from controlplane.node.tools import install_prometheus
from tests.helpers.envoy import wait_for
from tests.helpers.pipelines import apply, pipeline, until_ok

pytestmark = pytest.mark.slow
DEPLOY = PROJECT_ROOT / "deploy" / "prometheus"


@pytest.fixture
def prometheus(consul_agent: Any, tmp_path: Path, logs_dir: Path) -> Iterator[int]:
    """deploy/prometheus/prometheus.yml as shipped, pointed at the test's Consul, scraping every second."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DEPLOY / "rules.yml")]
    for job in config["scrape_configs"]:
        for sd in job["consul_sd_configs"]:
            sd["server"] = consul_agent.addr
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [
        str(install_prometheus()),
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    proc = ManagedProcess("prometheus", argv, logs_dir / "prometheus.log").start()
    proc.wait_ready(lambda: http_get(f"http://127.0.0.1:{port}/-/ready")[0] == 200, timeout=30)
    yield port
    proc.stop()


def query(port: int, expr: str) -> list[dict[str, Any]]:
    status, body = http_get(f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}")
    assert status == 200, body
    return json.loads(body)["data"]["result"]  # type: ignore[no-any-return]


async def test_recording_rules_give_per_variant_rate_errors_and_p99(
    control_plane: Any,
    gateway: Any,
    three_stages: list[Any],
    prometheus: int,
    tmp_path: Path,
) -> None:
    apply(control_plane, tmp_path, pipeline("watched"))
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/watched"
    await until_ok(url, {"text": "a b c"})
    stop = asyncio.Event()

    async def load() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                async with session.post(url, json={"text": "a b c"}) as resp:
                    await resp.read()
                await asyncio.sleep(0.01)

    traffic = asyncio.create_task(load())
    try:
        rate = 'mllambda:variant_requests:rate1m{pipeline="watched",stage="score"}'
        found = await wait_for(lambda: [r for r in query(prometheus, rate) if float(r["value"][1]) > 0], timeout=60)
        assert found[0]["metric"]["model"] == "score" and found[0]["metric"]["version"] == "v1"
        errors = query(prometheus, 'mllambda:variant_error_ratio:rate1m{pipeline="watched"}')
        assert errors and all(float(r["value"][1]) == 0 for r in errors), errors
        upstream = 'mllambda:model_upstream_p99_ms:1m{model=~"tokenize|count|score",version="v1"}'
        await wait_for(lambda: len(query(prometheus, upstream)) == 3, timeout=30)  # gateway and sidecars scraped
        await wait_for(lambda: query(prometheus, 'mllambda:model_predict_p99_seconds:1m{model="count"}'), timeout=30)
        ours = f"mllambda-control-plane-127.0.0.1-{control_plane.metrics_port}"
        up = {(t["metric"]["job"], t["metric"]["instance"]) for t in query(prometheus, "up == 1")}
        assert {("mllambda-control-plane", ours), ("mllambda-gateway", f"gateway of {ours}")} <= up, up
        assert {r.service_id for r in three_stages} <= {i for job, i in up if job == "mllambda-sidecar"}, up
        assert {r.service_id for r in three_stages} <= {i for job, i in up if job == "mllambda-runtime"}, up
    finally:
        stop.set()
        await traffic


SHORT = ["a b", "good day", "hi there", "the cat sat", "one two three", "yes"]
FOREIGN = [
    "der schnelle braune Fuchs springt ueber den faulen Hund und laeuft dann weit weg in den Wald hinein",
    "le renard brun rapide saute par-dessus le chien paresseux puis court loin dans la grande foret sombre",
]


def monitor_status(plane: Any, ref: str) -> dict[str, Any]:
    found = plane.cli("monitor", "status", ref, "-o", "json")
    assert found.returncode == 0, found.stderr
    items = json.loads(found.stdout)["items"]
    return items[0] if items else {}


def text_drift(row: dict[str, Any]) -> float:
    return max((d["psi"] for d in row.get("drift", []) if d["side"] == "inputs" and d["field"] == "text"), default=0)


async def test_an_input_mix_that_changes_drifts_past_its_threshold_and_prometheus_fires_the_alert(
    control_plane: Any, gateway: Any, start_runtime: Any, prometheus: int, tmp_path: Path
) -> None:
    """Model monitoring end to end: profiles in the runtime, a baseline, drift in /metrics, the project's alert."""
    for model in ("tokenize", "count", "score"):
        start_runtime(f"examples.trivial.models:{model}", model, "v1", extra=("--profile-percent=100",))
    apply(control_plane, tmp_path, pipeline("drifty"))
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/drifty"
    await until_ok(url, {"text": "a b"})
    texts = list(SHORT)

    async def load(stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession() as session:
            i = 0
            while not stop.is_set():
                async with session.post(url, json={"text": texts[i % len(texts)]}) as resp:
                    assert resp.status == 200
                i += 1
                await asyncio.sleep(0.01)

    stop = asyncio.Event()
    traffic = asyncio.create_task(load(stop))
    try:

        async def baseline_set() -> bool:  # the CLI in a thread: the load goes on meanwhile
            done = await asyncio.to_thread(control_plane.cli, "monitor", "baseline", "tokenize:v1", "--window", "30")
            assert done.returncode == 0 or "profiled requests of" in done.stderr, done.stderr
            return done.returncode == 0

        async def drifted() -> bool:
            return text_drift(await asyncio.to_thread(monitor_status, control_plane, "tokenize:v1")) > 0.2

        await wait_for(baseline_set, timeout=40, every=1)  # the first windows close and are read within ~20 s

        async def judged() -> dict[str, Any]:  # windows after the baseline read, and the text judged on them
            row = await asyncio.to_thread(monitor_status, control_plane, "tokenize:v1")
            return row if any(d["field"] == "text" for d in row.get("drift", [])) else {}

        steady = await wait_for(judged, timeout=40, every=1)
        assert steady["baseline"]["threshold"] == 0.2 and 0 <= text_drift(steady) < 0.2, steady["drift"]
        assert steady["fields"]["inputs.text"]["kinds"] == {"string": steady["fields"]["inputs.text"]["count"]}
        texts[:] = FOREIGN  # the callers change: long texts in other languages
        switched = asyncio.get_running_loop().time()
        await wait_for(drifted, timeout=60, every=1)
        assert asyncio.get_running_loop().time() - switched < 60
        table = (await asyncio.to_thread(control_plane.cli, "monitor", "status", "tokenize:v1")).stdout
        assert "inputs.text (length): PSI" in table and "DRIFTED" in table, table
        alert = 'ALERTS{alertname="MLLambdaModelDrift",alertstate="firing",model="tokenize",field="text"}'
        await wait_for(lambda: query(prometheus, alert), timeout=90)
        untouched = 'ALERTS{alertname="MLLambdaModelDrift",model="score"}'
        assert query(prometheus, untouched) == []  # score has no baseline: nothing is guessed
        # The monitoring page in a real browser: the drifted field, its lengths now drawn over the baseline's.
        from tests.helpers.observe import ARTIFACTS, browser

        page = f"http://127.0.0.1:{control_plane.metrics_port}/monitoring"
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "monitoring.png"
        await asyncio.to_thread(
            browser, f"--user-data-dir={tmp_path / 'chrome'}", f"--screenshot={shot}", "--window-size=1100,1600", page
        )
        assert shot.stat().st_size > 10_000
        dom = (
            await asyncio.to_thread(browser, f"--user-data-dir={tmp_path / 'chrome-dom'}", "--dump-dom", page)
        ).stdout
        section = dom.split('data-model="tokenize" data-version="v1"', 1)[1].split("</section>", 1)[0]
        assert 'class="field drifted" data-field="inputs.text"' in section, section[:2000]
        assert "inputs.text (length)" in section and 'data-series="now"' in section
        assert "drift (PSI) per field" in section
    finally:
        stop.set()
        await traffic
