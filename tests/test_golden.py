"""The Envoy configuration generated for the NLP pipeline, against golden files (Consul's xDS tests do this).

A change to translation shows as a reviewable diff of tests/golden/*.json, not as a handful of field
asserts. After a deliberate change: `./dev test tests/test_golden.py --update-golden`, then read the diff.
The inputs are fixed (addresses, ports, sockets), so the output depends on the code alone.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf.json_format import MessageToDict

from contract.service import RuntimeService
from controlplane.config import PROJECT_ROOT
from controlplane.pipeline.spec import parse_pipeline
from controlplane.translate.pipelines import Options, translate
from controlplane.xds.snapshot import Snapshot, short
from tests.helpers.translation import steady

GOLDEN = Path(__file__).parent / "golden"
NLP = yaml.safe_load((PROJECT_ROOT / "examples" / "nlp" / "stack.yaml").read_text())
HOSTS = {"features": "10.0.0.1", "classifier": "10.0.0.2"}  # the rest on the gateway's host, 10.0.0.9


def runtimes(mtls: bool = False) -> list[RuntimeService]:
    found = []
    for n, runtime in enumerate(NLP["runtimes"]):
        model, version = runtime["model"], runtime["version"]
        found.append(
            RuntimeService(
                f"{model}-{version}-0",
                model,
                version,
                HOSTS.get(model, "10.0.0.9"),
                runtime_port=7000 + n,
                runtime_uds=f"/run/mll/{model}-{version}-0.sock",
                ingress_port=8000 + n,
                egress_port=9000 + n,
                egress_uds=f"/run/mll/{model}-{version}-0-egress.sock",
                envoy_admin_port=19100 + n,
                passing=True,
                tls_dir=f"/run/mll/{model}-{version}-0-tls" if mtls else "",
            )
        )
    return found


def snapshots(mtls: bool) -> dict[str, Snapshot]:
    pipeline = parse_pipeline(NLP["pipelines"][0])
    tls = "/run/mll/gateway-tls" if mtls else ""
    options = Options(gateway_host="10.0.0.9", mtls=mtls, gateway_tls_dir=tls, run_folder="/run/mll")
    return translate(steady(pipeline), runtimes(mtls), options)


def as_json(snapshot: Snapshot) -> str:
    """Every resource of a snapshot as protojson, by type and name (stable order)."""
    plain: dict[str, Any] = {}
    for type_url, resources in sorted(snapshot.resources.items()):
        plain[short(type_url)] = {
            name: MessageToDict(message, preserving_proto_field_name=True)
            for name, message in sorted(resources.by_name.items())
        }
    return json.dumps(plain, indent=1, sort_keys=True) + "\n"


CASES = [
    ("gateway", "nlp-gateway.json", False),
    ("classifier-v1-0", "nlp-sidecar-classifier.json", False),
    ("gateway", "nlp-gateway-mtls.json", True),
    ("classifier-v1-0", "nlp-sidecar-classifier-mtls.json", True),
]


@pytest.mark.parametrize(("group", "golden", "mtls"), CASES)
def test_the_nlp_pipelines_envoy_config_is_the_golden_one(
    group: str, golden: str, mtls: bool, request: pytest.FixtureRequest
) -> None:
    made = as_json(snapshots(mtls)[group])
    path = GOLDEN / golden
    if request.config.getoption("--update-golden"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(made)
    want = path.read_text()
    diff = "".join(difflib.unified_diff(want.splitlines(True), made.splitlines(True), str(path), "generated", n=2))
    assert made == want, f"translation changed (rewrite with --update-golden if meant):\n{diff[:6000]}"


def test_a_changed_weight_shows_in_the_diff() -> None:
    """The comparison bites: the same input with one weight changed is not the golden file."""
    doc = json.loads(json.dumps(NLP["pipelines"][0]))
    doc["stages"][2]["branches"][0]["variants"] = [
        {"model": "net-sports", "version": "v1", "weight": 90},
        {"model": "net-sports", "version": "v2", "weight": 10},
    ]
    options = Options(gateway_host="10.0.0.9", run_folder="/run/mll")
    changed = translate(steady(parse_pipeline(doc)), runtimes(), options)["classifier-v1-0"]  # its egress routes
    assert as_json(changed) != (GOLDEN / "nlp-sidecar-classifier.json").read_text()
