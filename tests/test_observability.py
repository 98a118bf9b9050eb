"""What people running pipelines see: /metrics, the dashboard in a real browser, `mllambda status`."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers.components import passing
from tests.helpers.envoy import wait_for
from tests.helpers.observe import ARTIFACTS, browser, metric, scrape
from tests.helpers.pipelines import apply, pipeline, post, until_ok

pytestmark = pytest.mark.slow
M = "examples.trivial.models"
SPLIT = {
    "variants": [{"model": "score", "version": "v1", "weight": 90}, {"model": "score", "version": "v2", "weight": 10}]
}


@pytest.fixture
def split_pipeline(control_plane: Any, gateway: Any, start_runtime: Any, tmp_path: Path) -> str:
    passing(
        *(start_runtime(f"{M}:{model}", model, "v1", wait=False) for model in ("tokenize", "count", "score")),
        start_runtime(f"{M}:score_v2", "score", "v2", wait=False),
    )
    apply(control_plane, tmp_path, pipeline("watched", **SPLIT))
    return f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/watched"


async def test_metrics_move_with_traffic(control_plane: Any, split_pipeline: str) -> None:
    await until_ok(split_pipeline, {"text": "a b"})
    before = metric(scrape(control_plane), "mllambda_variant_requests_total", pipeline="watched", stage="score")
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            await post(session, split_pipeline, {"text": "a b"})
    await wait_for(
        lambda: (
            metric(scrape(control_plane), "mllambda_variant_requests_total", pipeline="watched", stage="score")
            >= before + 200
        )
    )
    text = scrape(control_plane)
    assert metric(text, "mllambda_variant_requests_total", stage="tokenize") >= 200  # counted at the gateway
    assert metric(text, "mllambda_variant_configured_share", model="score", version="v1") == 0.9
    v2 = metric(text, "mllambda_variant_observed_share", model="score", version="v2")
    assert 0.04 < v2 < 0.18, v2
    assert metric(text, "mllambda_xds_acks_total", node="gateway") > 0
    assert metric(text, "mllambda_xds_connected_streams", mode="sotw") >= 5  # gateway + 4 sidecars
    assert metric(text, "mllambda_pipeline_version", pipeline="watched") == 1
    assert metric(text, "mllambda_xds_push_seconds_count") > 0
    assert metric(text, "mllambda_snapshot_info", group="gateway") == 1
    assert metric(text, "mllambda_admin_requests_total", method="Apply", code="OK") >= 1


async def test_a_rejected_config_is_counted_and_shown(
    control_plane: Any, consul_agent: Any, start_envoy: Any, tmp_path: Path
) -> None:
    from controlplane.node.sidecar import render_bootstrap

    # Someone else holds the gateway port: Envoy must reject the gateway listener.
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", control_plane.gateway_port))
    squatter.listen()
    try:
        start_envoy(
            lambda admin: render_bootstrap("gateway", "gateway", control_plane.xds_addr, admin),
            wait_live=False,
            admin_port=control_plane.gateway_admin_port,
        )
        await wait_for(lambda: metric(scrape(control_plane), "mllambda_xds_nacks_total", node="gateway") >= 1)
        status = json.loads(scrape(control_plane, "/api/status"))
        rejected = [e for e in status["envoys"] if e["node"] == "gateway" and e["nack_error"]]
        assert rejected and "Address already in use" in rejected[0]["nack_error"], rejected
        # One row per node, its last NACK cut short, open on the dashboard because something is rejected.
        (gateway,) = [n for n in status["nodes"] if n["node"] == "gateway"]
        assert gateway["nack"].startswith("Listener ") and len(gateway["nack"]) <= 160, gateway
        assert gateway["acked"].startswith("Cluster ") and "Listener -" in gateway["acked"]
        page = scrape(control_plane, "/")
        assert "<details open><summary><h2>Envoys: 1 nodes, 1 rejecting config" in page
    finally:
        squatter.close()


def mllambda(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controlplane.cli", *args], capture_output=True, text=True, timeout=120
    )


async def test_dashboard_in_a_real_browser_matches_invoke(
    control_plane: Any, split_pipeline: str, tmp_path: Path
) -> None:
    await until_ok(split_pipeline, {"text": "a b"})
    gateway = f"--gateway=http://127.0.0.1:{control_plane.gateway_port}"
    invoke = await asyncio.to_thread(
        mllambda, "invoke", "watched", "--data", '{"text": "a b c"}', "--count", "1000", "-o", "json", gateway
    )
    measured = json.loads(invoke.stdout)
    assert measured["ok"] == 1000, measured
    invoke_v2 = measured["split"]["score"].get("score:v2", 0) / 1000

    url = f"http://127.0.0.1:{control_plane.metrics_port}/"
    dom = (await asyncio.to_thread(browser, "--user-data-dir=" + str(tmp_path / "chrome"), "--dump-dom", url)).stdout
    assert '<a href="/pipelines/watched">watched</a>' in dom
    rows = re.findall(r"<td class=\"variant\">(score:v\d)</td><td>([\d.]+)%</td><td class=\"observed\">([\d.]+)%", dom)
    shown = {variant: (float(weight), float(observed)) for variant, weight, observed in rows}
    assert shown["score:v1"][0] == 90.0 and shown["score:v2"][0] == 10.0
    assert abs(shown["score:v2"][1] / 100 - invoke_v2) <= 0.02, (shown, invoke_v2)
    assert "tokenize-v1-" in dom  # runtimes and Envoys are listed
    assert '<p class="history">v1 (apply' in dom  # the versions, under the pipeline's "history"

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    profile = "--user-data-dir=" + str(tmp_path / "chrome2")
    await asyncio.to_thread(browser, profile, f"--screenshot={shot}", "--window-size=1280,1400", url)
    assert shot.exists() and shot.stat().st_size > 10_000

    dashboard = f"--dashboard=http://127.0.0.1:{control_plane.metrics_port}"
    status = await asyncio.to_thread(mllambda, "status", dashboard)
    assert status.returncode == 0, status.stderr
    assert re.search(r"score\s+score:v2\s+10\.0%\s+[\d.]+%", status.stdout), status.stdout


def test_the_dashboard_answers_only_requests_addressed_to_this_machine(control_plane: Any) -> None:
    """DNS rebinding: a page elsewhere gets a browser to call 127.0.0.1 under its own host name."""
    import urllib.error
    import urllib.request

    for path in ("/", "/api/status", "/metrics"):
        url = f"http://127.0.0.1:{control_plane.metrics_port}{path}"
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Host": "localhost"}), timeout=10) as ok:
            assert ok.status == 200
        forged = urllib.request.Request(url, headers={"Host": f"evil.example:{control_plane.metrics_port}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(forged, timeout=10)
        assert refused.value.code == 421


async def test_observed_shares_count_only_the_current_version(
    control_plane: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    """A new user's report: after 90/10 replaced 100/0, shares since Envoy start read 95.4/4.6."""
    passing(
        *(start_runtime(f"{M}:{model}", model, "v1", wait=False) for model in ("tokenize", "count", "score")),
        start_runtime(f"{M}:score_v2", "score", "v2", wait=False),
    )
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/shifted"
    for spec, requests in ((pipeline("shifted"), 300), (pipeline("shifted", **SPLIT), 500)):
        (tmp_path / "p.yaml").write_text(json.dumps(spec))
        applied = control_plane.cli("apply", "-f", str(tmp_path / "p.yaml"), "--wait")
        assert applied.returncode == 0, applied.stderr
        await asyncio.sleep(0.5)  # the reading where the version's window starts
        async with aiohttp.ClientSession() as session:
            answers = [await post(session, url, {"text": "a b"}) for _ in range(requests)]
        assert {status for status, _, _ in answers} == {200}
    await asyncio.sleep(1.5)  # the scraper's one-second cache
    rows = [t for t in json.loads(scrape(control_plane, "/api/status"))["traffic"] if t["pipeline"] == "shifted"]
    score = {t["version"]: t for t in rows if t["stage"] == "score"}
    assert sum(t["requests"] for t in score.values()) == 500, score  # the 300 of version 1 are not in it
    assert 0.06 <= score["v2"]["observed_share"] <= 0.14, score
    assert 0 < score["v2"]["window_seconds"] <= 60
    status = control_plane.cli("status", f"--dashboard=http://127.0.0.1:{control_plane.metrics_port}")
    assert "observed over the last" in status.stdout, status.stdout + status.stderr


def test_the_pipeline_tax_is_split_per_hop_from_the_timing_header() -> None:
    from controlplane.invoke import HopCost, hop_costs, hop_table

    costs = hop_costs("a=1.00/10.00/8.00, b=2.00/7.00/-", wall_ms=12.0)
    assert costs == [HopCost("a", 1.0, 1.0, 2.0), HopCost("b", 2.0, 5.0, 1.0)]
    assert hop_costs("a=1/oops/2", 5.0) == [] and hop_costs("", 5.0) == []
    table = hop_table([costs, hop_costs("a=3.00/12.00/8.00, b=2.00/7.00/-", wall_ms=14.0)])
    assert table[0] == {"stage": "a", "model_ms": 2.0, "sdk_ms": 1.0, "mesh_ms": 2.0}
