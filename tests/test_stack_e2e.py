"""The README walk-through, end to end: up -> invoke -> apply v2 -> observed split -> down."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.common import nlp_stack
from controlplane.admin.client import AdminClient
from controlplane.config import PROJECT_ROOT
from controlplane.node import processes
from tests.helpers.envoy import admin_stat, near_share
from tests.helpers.stack import mllambda
from tests.helpers.triton import infer_with_triton, infer_with_triton_grpc

pytestmark = pytest.mark.slow
NLP = PROJECT_ROOT / "examples" / "nlp"


def drawn(url: str, profile: Path, shot: str) -> dict[str, dict[tuple[str, str], tuple[float, float | None]]]:
    """The pipeline page as a real browser renders it: a screenshot kept in test-artifacts/, and per stage
    the drawn variants: (group, model:version) -> (configured weight, share seen)."""
    from tests.helpers.observe import ARTIFACTS, browser

    ARTIFACTS.mkdir(exist_ok=True)
    browser(f"--user-data-dir={profile}", f"--screenshot={ARTIFACTS / shot}", "--window-size=1100,900", url)
    assert (ARTIFACTS / shot).stat().st_size > 10_000
    dom = browser(f"--user-data-dir={profile}-dom", "--dump-dom", url).stdout
    assert dom.count('<svg class="chart"') == 3, dom[:500]  # requests/s, 5xx ratio and p99 over time
    found: dict[str, dict[tuple[str, str], tuple[float, float | None]]] = {}
    stage = ""
    for match in re.finditer(
        r"font-weight=\"bold\">([a-z0-9-]+)</text>|<g class=\"variant[a-z ]*\" data-group=\"([^\"]*)\" "
        r"data-variant=\"([^\"]+)\" data-weight=\"([\d.]+)\" data-seen=\"([\d.]*)\"",
        dom,
    ):
        if match.group(1):
            stage = match.group(1)
            continue
        seen = float(match.group(5)) if match.group(5) else None
        found.setdefault(stage, {})[(match.group(2), match.group(3))] = (float(match.group(4)), seen)
    return found


def history(env: dict[str, str]) -> list[tuple[int, str]]:
    found = json.loads(mllambda("history", "pipeline", "nlp", "-o", "json", env=env).stdout)
    return [(int(h["version"]), h["cause"]) for h in found["items"]]


def changed_in_browser(dashboard: str, sign_in: str, tmp_path: Path, env: dict[str, str]) -> None:
    """The seed's second scenario from the pages alone, in a real browser: back to v1 from the history, add
    net-food:v2 at 10% to the food branch, see the diff, apply, and watch the share seen on the pipeline's
    page (which updates itself) reach ~10% under load. On the way: a refused weight shows its field's error and
    changes nothing, the shares follow the weights as they are typed, the form is reachable by keyboard, and
    every page passes axe-core in light and dark, its screenshots kept in docs/screenshots.
    A post without the session changes nothing."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.wait import WebDriverWait

    from tests.helpers.observe import driven_browser
    from tests.helpers.ui import looked_at, reached_by_keyboard

    food = "stages[2].branches[2].variants"  # network · branch food

    def after_submit(css: str) -> Any:
        return WebDriverWait(page, 15).until(
            shown.presence_of_element_located((By.CSS_SELECTOR, css)), page.page_source
        )

    with driven_browser(tmp_path / "selenium") as page:
        page.get(sign_in)
        assert page.current_url == dashboard + "/"
        looked_at(page, "pipelines")
        page.get(dashboard + "/pipelines/nlp/edit")
        page.find_element(By.XPATH, "//table[@id='history']//button[text()='roll back to v1']").click()
        assert "version 3 created: rollback to v1" in after_submit("#note").text
        assert [v for v, _ in history(env)] == [1, 2, 3]

        weight = page.find_element(By.NAME, f"{food}[0].weight")
        weight.clear()
        weight.send_keys("-3")
        shares = page.find_elements(By.CSS_SELECTOR, f"fieldset[data-path='{food}'] output")
        assert [s.text for s in shares] == ["-"]  # the shares follow the weights as they are typed
        page.find_element(By.ID, "review").click()
        error = after_submit(f"span.error[data-for='{food}[0].weight']")
        assert error.text == "must be between 0 and 10000, got -3", error.text
        assert history(env)[-1][0] == 3  # refused: nothing written
        page.find_element(By.NAME, f"{food}[0].weight").clear()
        page.find_element(By.NAME, f"{food}[0].weight").send_keys("1")
        Select(page.find_element(By.NAME, f"{food}.add")).select_by_visible_text("net-food:v2")
        page.find_element(By.NAME, f"{food}.add_share").send_keys("10")
        looked_at(page, "edit")
        assert reached_by_keyboard(page, "review")
        page.find_element(By.ID, "review").click()
        diff = after_submit("#diff").text
        assert "-      weight: 1\n+      weight: 90" in diff, diff
        assert "+    - model: net-food\n+      version: v2\n+      weight: 10" in diff, diff
        assert history(env)[-1][0] == 3  # a review writes nothing
        looked_at(page, "review")
        page.find_element(By.ID, "apply").click()
        assert "version 4 created" in after_submit("#note").text
        assert history(env)[-1] == (4, "ui")

        # Under load, the pipeline's page shows the share seen reach ~10%, updating itself (no reload).
        admin = AdminClient(env["MLLAMBDA_ADMIN_ADDR"])
        deadline = time.monotonic() + 30
        while not admin.gateway_has("nlp", 4):
            assert time.monotonic() < deadline, "version 4 not in traffic after 30 s"
            time.sleep(0.2)
        page.get(dashboard + "/pipelines/nlp")
        pasta = '{"text": "the pasta was delicious"}'
        load = mllambda("invoke", "nlp", "--data", pasta, "--count", "2000", "-o", "json", env=env)
        split = json.loads(load.stdout)
        assert (split["ok"], split["errors"]) == (2000, 0)
        assert near_share(split["split"]["network"].get("net-food:v2", 0), 2000, 0.10), split["split"]
        v2 = "g.variant[data-group='food'][data-variant='net-food:v2']"

        def seen_near_ten_percent(driver: Any) -> bool:
            found = driver.find_elements(By.CSS_SELECTOR, v2)
            seen = found[0].get_attribute("data-seen") if found else ""
            return bool(seen) and abs(float(seen) - 0.10) <= 0.03

        WebDriverWait(page, 30).until(seen_near_ten_percent, "the page never showed net-food:v2 near 10%")
        assert page.find_element(By.CSS_SELECTOR, v2).get_attribute("data-health") == "passing"
        looked_at(page, "pipeline")
        for path, shot in (
            ("/pipelines/nlp/diff?from=3&to=4", "diff"),
            ("/yaml?name=nlp", "yaml"),
            ("/models", "models"),
            ("/monitoring", "monitoring"),
            ("/runtimes", "runtimes"),
        ):
            page.get(dashboard + path)
            looked_at(page, shot)
        page.get(dashboard + "/models")  # every version runs here, in its own environment built on this host
        assert page.page_source.count(">built on this host") == 8 and "not built" not in page.page_source
        page.get(dashboard + "/runtimes")
        rows = {
            r.find_elements(By.TAG_NAME, "td")[0].text: r.find_elements(By.TAG_NAME, "td")[1].text
            for r in page.find_elements(By.CSS_SELECTOR, "#runtimes tr")[1:]
        }
        assert rows["net-food:v2"] == "1/1" and len(rows) == 8, rows
        page.find_element(By.ID, "sign-out").click()  # from any page: its bar carries the session's CSRF value
        WebDriverWait(page, 15).until(shown.url_to_be(dashboard + "/"), page.current_url)  # the click returns first
        assert page.find_elements(By.CSS_SELECTOR, "header a[href='/login']")  # signed out: the bar says so
        page.get(dashboard + "/login")
        looked_at(page, "sign-in")
    forged = urllib.request.Request(
        dashboard + "/pipelines/nlp/edit", data=f"{food}[0].weight=50".encode(), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(forged, timeout=10)
    assert refused.value.code == 403 and history(env)[-1][0] == 4


def replayed_v2_first(gateway_port: int, tmp_path: Path, env: dict[str, str]) -> None:
    """500 recorded requests replayed through pipeline-v2.yaml before it takes any traffic: the branches whose
    network changed answer differently, every other request exactly as recorded, and nothing is written."""
    import csv
    from concurrent.futures import ThreadPoolExecutor

    with (NLP / "data" / "reviews.tsv").open() as f:
        texts = [row["text"] for row in csv.DictReader(f, delimiter="\t")]

    def ask(i: int) -> int:
        body = json.dumps({"text": texts[i % len(texts)]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{gateway_port}/pipelines/nlp", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=30) as answer:
            return int(answer.status)

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(ask, range(500))) == {200}
    log = tmp_path / "state" / "run" / "payloads" / "nlp.jsonl"  # where the stack's runtimes write it
    deadline = time.monotonic() + 10
    while len(log.read_text().splitlines()) < 500:  # the writer is behind the answers
        assert time.monotonic() < deadline
        time.sleep(0.1)
    report_file = tmp_path / "replay.json"
    candidate = str(NLP / "pipeline-v2.yaml")
    done = mllambda("replay", "nlp", "--candidate", candidate, "--rate", "200", "--report", str(report_file), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_file.read_text())
    assert report["requests"] >= 500 and report["failed"] == 0, report
    chains = {c["chain"]: c for c in report["by_chain"]}
    assert chains["same models"]["equal_share"] == 1.0 and chains["same models"]["requests"] > 350, chains
    changed = {c for c in chains if c != "same models"}
    assert changed and changed <= {f"network: net-{c}:v1 -> net-{c}:v2" for c in ("sports", "tech", "food")}, chains
    assert all(chains[c]["changed_share"] > 0.5 for c in changed), chains  # another network, other confidences
    assert "network: net-" in done.stdout  # the table names them
    assert history(env) == [(1, "apply")]  # nothing written to the pipeline
    # What features:v1 saw so far (reviews of every kind) becomes its baseline, once its windows are read.
    deadline = time.monotonic() + 45
    while True:
        base = mllambda("monitor", "baseline", "features:v1", "--window", "120", env=env)
        assert base.returncode == 0 or "profiled requests of" in base.stderr, base.stderr
        counted = re.search(r"baseline set: (\d+) profiled requests", base.stdout)
        if counted and int(counted.group(1)) >= 500:  # the recorded requests' windows have all been read
            break
        assert time.monotonic() < deadline, base.stdout + base.stderr
        time.sleep(2)


def text_drifted(env: dict[str, str]) -> tuple[float, Any]:
    """How far the text features:v1 sees has drifted from its baseline (the larger PSI of values and lengths)."""
    deadline = time.monotonic() + 60
    while True:
        rows = json.loads(mllambda("monitor", "status", "features:v1", "-o", "json", env=env).stdout)["items"]
        psi = max((d["psi"] for d in rows[0]["drift"] if d["field"] == "text"), default=0.0) if rows else 0.0
        if psi > 0.2 or time.monotonic() > deadline:
            return float(psi), rows
        time.sleep(2)


def test_nlp_walkthrough(tmp_path: Path) -> None:
    stack = nlp_stack()  # written elsewhere below: its package folders made absolute
    stack["pipelines"][0]["logging"] = {"percent": 100}  # every request recorded, for the replay below
    stack["runtimes"][0]["args"] = ["--profile-percent=100"]  # features profiles every request: its drift below
    ports = {
        k: processes.free_port() for k in ("consul", "xds", "admin", "gateway", "gateway_admin", "kafka", "bridge")
    }
    ports["controlplane_metrics"] = processes.free_port()
    stack["ports"] = ports
    (tmp_path / "stack.yaml").write_text(yaml.safe_dump(stack))
    env = {
        "MLLAMBDA_STATE_DIR": str(tmp_path / "state"),
        "MLLAMBDA_ADMIN_ADDR": f"127.0.0.1:{ports['admin']}",
        "MLLAMBDA_GATEWAY": f"http://127.0.0.1:{ports['gateway']}",
    }
    up = mllambda("up", "-f", str(tmp_path / "stack.yaml"), "--detach", env=env)
    state_file = tmp_path / "state" / "stack.json"
    pids = [p["pid"] for p in json.loads(state_file.read_text())["processes"]] if state_file.exists() else []
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "8/8 passing" in up.stdout
        assert f"gateway        http://127.0.0.1:{ports['gateway']}" in up.stdout
        # Each model version is a package in its own environment: the v1 models share one lock, the v2 another.
        models = json.loads(mllambda("get", "models", "-o", "json", env=env).stdout)["items"]
        assert len(models) == 8 and len({m["lock_hash"] for m in models}) == 2, models

        one = mllambda(
            "invoke", "nlp", "--data", '{"text": "the striker scored a brilliant goal"}', "-o", "json", env=env
        )
        assert one.returncode == 0, one.stderr
        answer = json.loads(one.stdout)
        assert answer["result"]["category"] == "sports"
        assert answer["result"]["sentiment"] in ("positive", "negative")
        assert answer["served_by"] == {
            "features": "features:v1",
            "classify": "classifier:v1",
            "network": "net-sports:v1",
        }
        # Where the time went, per hop: model, runtime SDK, and the mesh on the way in.
        assert [h["stage"] for h in answer["hops"]] == ["features", "classify", "network"]
        assert all(h["model_ms"] > 0 and h["mesh_ms"] > 0 and h["sdk_ms"] >= 0 for h in answer["hops"]), answer["hops"]

        # The same pipeline as an Open Inference Protocol model, called by Triton's own client.
        oip_answer = infer_with_triton(ports["gateway"], "nlp", "the striker scored a brilliant goal")
        assert oip_answer["category"] == "sports" and oip_answer["sentiment"] == answer["result"]["sentiment"]
        assert oip_answer["sentiment_confidence"] == answer["result"]["sentiment_confidence"]
        over_grpc = infer_with_triton_grpc(ports["gateway"], "nlp", "the striker scored a brilliant goal")
        assert over_grpc == oip_answer  # OIP over gRPC, on the gateway's port: the same answer

        page = f"http://127.0.0.1:{ports['controlplane_metrics']}/pipelines/nlp"
        before = drawn(page, tmp_path / "chrome-v1", "nlp-v1.png")
        assert {key: weight for key, (weight, _) in before["network"].items()} == {
            ("sports", "net-sports:v1"): 1.0,
            ("tech", "net-tech:v1"): 1.0,
            ("food", "net-food:v1"): 1.0,
        }
        assert before["network"][("sports", "net-sports:v1")][1] == 1.0  # the requests so far: sports

        replayed_v2_first(ports["gateway"], tmp_path, env)

        applied = mllambda("apply", "-f", str(NLP / "pipeline-v2.yaml"), "--wait", env=env)
        assert "pipeline/nlp created (version 2)" in applied.stdout, applied.stderr
        many = mllambda(
            "invoke", "nlp", "--data", '{"text": "the pasta was delicious"}', "--count", "1000", "-o", "json", env=env
        )
        split = json.loads(many.stdout)
        assert (split["ok"], split["errors"]) == (1000, 0)
        v2_share = split["split"]["network"].get("net-food:v2", 0) / 1000
        assert near_share(v2_share * 1000, 1000, 0.10), split
        # A thousand times the same review, after a mix of every kind: the input text has drifted.
        psi, rows = text_drifted(env)
        assert psi > 0.2, rows
        # On one host the runtimes' output goes through the gateway Envoy, mTLS or not (architecture, "Same host").
        assert admin_stat(ports["gateway_admin"], "cluster.classifier_v1.upstream_rq_total") >= 1000
        # The page draws every variant with its weight, and the share seen since v2 matches what invoke counted.
        after = drawn(page, tmp_path / "chrome-v2", "nlp-v2.png")
        weights = {variant: weight for (_, variant), (weight, _) in after["network"].items()}
        assert weights == {
            f"net-{c}:{v}": (0.9 if v == "v1" else 0.1) for c in ("sports", "tech", "food") for v in ("v1", "v2")
        }
        seen_v2 = after["network"][("food", "net-food:v2")][1]
        assert seen_v2 is not None and abs(seen_v2 - v2_share) <= 0.02, (seen_v2, v2_share)

        status = json.loads(processes.http_get(f"http://127.0.0.1:{ports['controlplane_metrics']}/api/status")[1])
        assert [p["version"] for p in status["pipelines"]] == [2]

        # The dashboard, signed in with the link `up` printed: the seed's second scenario from the pages alone.
        link = re.search(r"sign in there\s+(\S+)", up.stdout)
        assert link, up.stdout
        changed_in_browser(f"http://127.0.0.1:{ports['controlplane_metrics']}", link.group(1), tmp_path, env)

        # Both networks at once (an ensemble), through the stack's mTLS: each member admitted by its RBAC.
        ensemble = mllambda("apply", "-f", str(NLP / "pipeline-ensemble.yaml"), "--wait", env=env)
        assert "pipeline/nlp created (version 5)" in ensemble.stdout, ensemble.stderr
        both = mllambda("invoke", "nlp", "--data", '{"text": "the pasta was delicious"}', "-o", "json", env=env)
        assert both.returncode == 0, both.stderr
        answer = json.loads(both.stdout)
        assert answer["result"]["tfidf"]["network"] == "tfidf+mlp"
        assert answer["result"]["word2vec"]["network"] == "word2vec+mlp"
        assert answer["served_by"]["network.tfidf"] == "net-food:v1"
        assert answer["served_by"]["network.word2vec"] == "net-food:v2"

        # The one-line switch to Kafka: same request, same kind of answer, now through topics.
        kafka = mllambda("apply", "-f", str(NLP / "pipeline-kafka.yaml"), "--wait", env=env)
        assert "pipeline/nlp created (version 6)" in kafka.stdout, kafka.stderr
        striker = '{"text": "the striker scored a brilliant goal"}'
        over_kafka = mllambda("invoke", "nlp", "--data", striker, "-o", "json", env=env)
        assert over_kafka.returncode == 0, over_kafka.stderr
        assert json.loads(over_kafka.stdout)["result"]["category"] == "sports"
        assert json.loads(over_kafka.stdout)["served_by"]["network"] in ("net-sports:v1", "net-sports:v2")
        assert infer_with_triton(ports["gateway"], "nlp", "the striker scored a brilliant goal")["category"] == "sports"
        grpc_answer = infer_with_triton_grpc(ports["gateway"], "nlp", "the striker scored a brilliant goal")
        assert grpc_answer["category"] == "sports"
    finally:
        down = mllambda("down", env=env)
    assert down.returncode == 0, down.stderr
    assert "stack 'nlp' stopped" in down.stdout
    assert pids and not [pid for pid in pids if processes.exists(pid)]
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert leftovers == []
