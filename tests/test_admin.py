"""The admin API and CLI against a real control plane process and a real Consul."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import consul
import grpc
import pytest
import yaml
from google.protobuf import json_format
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb
from controlplane._gen.mllambda.admin.v1 import admin_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).parent / "data" / "three-stage.yaml"


def spec_with_weights(name: str, a: int, b: int) -> Any:
    return json_format.ParseDict(
        {
            "name": name,
            "transport": "http",
            "stages": [
                {
                    "name": "s",
                    "variants": [
                        {"model": "m", "version": "v1", "weight": a},
                        {"model": "m", "version": "v2", "weight": b},
                    ],
                }
            ],
        },
        pb.PipelineSpec(),
    )


def test_cli_apply_get_history_rollback_delete(control_plane: Any, tmp_path: Path) -> None:
    applied = control_plane.cli("apply", "-f", str(EXAMPLE))
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines()[0] == "pipeline/nlp created (version 1)"
    again = control_plane.cli("apply", "-f", str(EXAMPLE))
    assert again.stdout.splitlines()[0] == "pipeline/nlp unchanged (version 1)"

    v2 = yaml.safe_load(EXAMPLE.read_text())
    v2["stages"][1]["variants"][0]["weight"] = 50
    v2["stages"][1]["variants"][1]["weight"] = 50
    (tmp_path / "v2.yaml").write_text(yaml.safe_dump(v2))
    assert "created (version 2)" in control_plane.cli("apply", "-f", str(tmp_path / "v2.yaml")).stdout

    got = json.loads(control_plane.cli("get", "pipeline", "nlp", "-o", "json").stdout)
    assert got["version"] == "2"
    assert [v["weight"] for v in got["spec"]["stages"][1]["variants"]] == [50, 50]
    table = control_plane.cli("get", "pipelines").stdout.splitlines()
    assert table[0].split() == ["NAME", "VERSION", "TRANSPORT", "STAGES", "CREATED", "CAUSE"]
    assert table[1].split()[:4] == ["nlp", "2", "http", "3"]

    rolled = control_plane.cli("rollback", "pipeline", "nlp", "--to-version", "1")
    assert "now version 3" in rolled.stdout, rolled.stderr
    history = yaml.safe_load(control_plane.cli("history", "pipeline", "nlp", "-o", "yaml").stdout)
    assert [(h["version"], h["cause"]) for h in history["items"]] == [
        ("1", "apply"),
        ("2", "apply"),
        ("3", "rollback to 1"),
    ]
    assert history["items"][2]["spec"] == history["items"][0]["spec"]

    described = control_plane.cli("describe", "pipeline", "nlp").stdout
    assert "classifier:v1 weight=90" in described and "branch sports: mlp-sports:v1" in described

    deleted = control_plane.cli("delete", "pipeline", "nlp")
    assert deleted.returncode == 0 and "history kept" in deleted.stdout
    missing = control_plane.cli("get", "pipeline", "nlp")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: pipeline 'nlp' not found"
    assert "Traceback" not in missing.stderr
    assert len(yaml.safe_load(control_plane.cli("history", "pipeline", "nlp", "-o", "yaml").stdout)["items"]) == 3


def test_restarting_the_control_plane_loses_nothing(control_plane: Any) -> None:
    assert control_plane.cli("apply", "-f", str(EXAMPLE)).returncode == 0
    control_plane.stop()
    control_plane.start()
    got = json.loads(control_plane.cli("get", "pipeline", "nlp", "-o", "json").stdout)
    assert (got["spec"]["name"], got["version"]) == ("nlp", "1")


def test_invalid_file_applies_nothing_and_names_each_problem(control_plane: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: ok\nstages: [{name: s, variants: [{model: m, version: v1}]}]\n---\n"
        "name: Nope\ntransport: smoke\nstages: []\n"
    )
    result = control_plane.cli("apply", "-f", str(bad))
    assert result.returncode == 1
    assert "document 2: name: 'Nope' is not valid" in result.stderr
    assert "document 2: transport: 'smoke' is not one of http, uds, kafka" in result.stderr
    assert "Traceback" not in result.stderr
    assert "No resources" not in control_plane.cli("get", "pipelines").stderr
    assert control_plane.cli("get", "pipeline", "ok").returncode == 1  # the valid one was not applied


def test_cli_says_what_to_do_when_the_control_plane_is_down(control_plane: Any) -> None:
    control_plane.stop()
    result = control_plane.cli("get", "pipelines")
    assert result.returncode == 1
    assert "hint: is the control plane running" in result.stderr
    assert "Traceback" not in result.stderr


async def test_concurrent_applies_lose_and_duplicate_nothing(control_plane: Any) -> None:
    async def client(offset: int) -> list[tuple[int, Any]]:
        async with grpc.aio.insecure_channel(control_plane.admin_addr) as channel:
            stub = pb_grpc.PipelineAdminStub(channel)
            accepted = []
            for i in range(12):
                spec = spec_with_weights("race", offset + i, 1)
                reply = await stub.Apply(pb.ApplyRequest(spec=spec))
                accepted.append((reply.pipeline.version, spec))
            return accepted

    results = await asyncio.gather(client(100), client(200))
    accepted = [item for result in results for item in result]
    async with grpc.aio.insecure_channel(control_plane.admin_addr) as channel:
        history = await pb_grpc.PipelineAdminStub(channel).History(pb.HistoryRequest(name="race"))
    versions = [v.version for v in history.versions]
    assert versions == list(range(1, 25))
    assert sorted(v for v, _ in accepted) == versions  # every accepted apply is its own version
    by_version = {v.version: v.spec for v in history.versions}
    for version, spec in accepted:
        assert by_version[version].stages[0].variants[0].weight == spec.stages[0].variants[0].weight


async def test_reflection_lists_the_admin_and_health_services(control_plane: Any) -> None:
    async with grpc.aio.insecure_channel(control_plane.admin_addr) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request])):
            names = {s.name for s in reply.list_services_response.service}
            break
    assert {"mllambda.admin.v1.PipelineAdmin", "grpc.health.v1.Health"} <= names


def json_float(value: float) -> float | str:
    """Protobuf's JSON form quotes the non-finite floats."""
    return value if math.isfinite(value) else {"inf": "Infinity", "-inf": "-Infinity"}.get(str(value), "NaN")


labels = st.one_of(st.text(max_size=80), st.sampled_from(["", "ok", "UPPER", "a" * 64, "x/y", "a\nb"]))
variants = st.fixed_dictionaries(
    {"model": labels, "version": labels},
    optional={"weight": st.integers(min_value=0, max_value=2**32 - 1)},
)
stages = st.fixed_dictionaries(
    {"name": labels},
    optional={
        "variants": st.lists(variants, max_size=18),
        "branches": st.lists(
            st.fixed_dictionaries({"key": labels, "variants": st.lists(variants, max_size=3)}), max_size=3
        ),
        "timeout_ms": st.integers(min_value=0, max_value=2**32 - 1),
        "shadow": st.fixed_dictionaries(
            {"model": labels, "version": labels, "percent": st.floats(allow_nan=True).map(json_float)}
        ),
    },
)
hostile = st.fixed_dictionaries({"name": labels, "transport": labels, "stages": st.lists(stages, max_size=34)})


def test_hostile_definitions_are_refused_and_write_nothing(control_plane: Any, consul_agent: Any) -> None:
    refused = accepted = 0
    with grpc.insecure_channel(control_plane.admin_addr) as channel:
        stub = pb_grpc.PipelineAdminStub(channel)

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(hostile)
        def check(spec: dict[str, Any]) -> None:
            nonlocal refused, accepted
            try:
                stub.Apply(pb.ApplyRequest(spec=json_format.ParseDict(spec, pb.PipelineSpec())), timeout=30)
                accepted += 1
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
                assert ": " in (err.details() or "")  # every problem carries its field path
                refused += 1

        check()
        listed = stub.List(pb.ListRequest(), timeout=10).pipelines  # still up and answering

    _, keys = consul.Consul(port=consul_agent.http_port).kv.get(control_plane.kv_prefix, keys=True)
    written = {key.split("/")[1] for key in keys or []}
    assert refused > 100
    assert len(written) == len(listed) <= accepted  # nothing refused reached Consul


def test_kafka_transport_without_a_broker_is_refused(control_plane: Any, tmp_path: Path) -> None:
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["transport"] = "kafka"
    (tmp_path / "kafka.yaml").write_text(yaml.safe_dump(spec))
    result = control_plane.cli("apply", "-f", str(tmp_path / "kafka.yaml"))
    assert result.returncode == 1
    assert "transport 'kafka' needs a Kafka broker: start the control plane with --kafka-bootstrap" in result.stderr
    assert control_plane.cli("get", "pipeline", "nlp").returncode == 1  # nothing was written


def test_a_second_control_plane_sees_the_same_pipelines(control_plane: Any, logs_dir: Path) -> None:
    from controlplane.node import processes
    from tests.helpers.components import ControlPlaneProc

    assert control_plane.cli("apply", "-f", str(EXAMPLE)).returncode == 0
    second = ControlPlaneProc(
        processes.free_port(),
        processes.free_port(),
        control_plane.consul_port,
        control_plane.kv_prefix,
        logs_dir / "controlplane-second.log",
    ).start()
    try:
        got = json.loads(second.cli("get", "pipeline", "nlp", "-o", "json").stdout)
        assert (got["spec"]["name"], got["version"]) == ("nlp", "1")
        v2 = yaml.safe_load(EXAMPLE.read_text())
        v2["transport"] = "uds"
        second.cli("apply", "-f", "-", stdin=yaml.safe_dump(v2))
        assert json.loads(control_plane.cli("get", "pipeline", "nlp", "-o", "json").stdout)["version"] == "2"
    finally:
        second.stop()


def test_bearer_token_is_required_when_set(control_plane: Any) -> None:
    control_plane.stop()
    control_plane.env = {"MLLAMBDA_TOKEN": "s3cret"}
    control_plane.start()
    denied = control_plane.cli("get", "pipelines")
    assert denied.returncode == 1
    assert "missing or wrong bearer token" in denied.stderr and "MLLAMBDA_TOKEN" in denied.stderr
    assert control_plane.cli("get", "pipelines", token="wrong").returncode == 1
    assert control_plane.cli("get", "pipelines", token="S3CRET").returncode == 1  # the token's case counts
    assert control_plane.cli("get", "pipelines", token="s3cret").returncode == 0


def test_names_are_checked_at_every_admin_call_before_they_reach_a_key(control_plane: Any) -> None:
    here = control_plane.kv_prefix.rstrip("/")
    # Unchecked, Consul's URL normalisation would read our own "victim" back through "..".
    hostile = [f"../{here}/victim", "victim\n", "victim/v/00000001", "Victim", "a" * 64, "x y"]
    with grpc.insecure_channel(control_plane.admin_addr) as channel:
        stub = pb_grpc.PipelineAdminStub(channel)
        stub.Apply(pb.ApplyRequest(spec=spec_with_weights("victim", 1, 1)), timeout=10)
        calls = [
            lambda n: stub.Get(pb.GetRequest(name=n), timeout=10),
            lambda n: stub.History(pb.HistoryRequest(name=n), timeout=10),
            lambda n: stub.Status(pb.StatusRequest(name=n), timeout=10),
            lambda n: stub.Rollback(pb.RollbackRequest(name=n, to_version=1), timeout=10),
            lambda n: stub.Delete(pb.DeleteRequest(name=n), timeout=10),
        ]
        for call in calls:
            for name in hostile:
                with pytest.raises(grpc.RpcError) as caught:
                    call(name)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, caught.value.details())
                assert (caught.value.details() or "").startswith("name: ")
        assert stub.Get(pb.GetRequest(name="victim"), timeout=10).pipeline.version == 1  # untouched


def test_history_is_paged_newest_first_pages_oldest_first_within(control_plane: Any) -> None:
    with grpc.insecure_channel(control_plane.admin_addr) as channel:
        stub = pb_grpc.PipelineAdminStub(channel)
        for i in range(7):
            stub.Apply(pb.ApplyRequest(spec=spec_with_weights("paged", 10 + i, 1)))

    def page(*flags: str) -> tuple[list[int], str]:
        done = control_plane.cli("history", "pipeline", "paged", "-o", "json", *flags)
        assert done.returncode == 0, done.stderr
        return [int(v["version"]) for v in json.loads(done.stdout)["items"]], done.stderr

    assert page() == ([1, 2, 3, 4, 5, 6, 7], "")
    newest, hint = page("--limit", "3")
    assert newest == [5, 6, 7] and "--before 5" in hint
    assert page("--limit", "3", "--before", "5") == ([2, 3, 4], "older versions: mllambda history paged --before 2\n")
    assert page("--limit", "3", "--before", "2") == ([1], "")
    missing = control_plane.cli("history", "pipeline", "nope", "--before", "3")
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_a_config_only_envoy_refuses_is_refused_at_apply_with_envoys_words(control_plane: Any, tmp_path: Path) -> None:
    """Our validator allows 64 branches with 64-character keys; Envoy's 4 KiB direct-response limit does not."""
    branches = [{"key": f"k{i:02d}" + "x" * 60, "variants": [{"model": "n", "version": "v1"}]} for i in range(64)]
    spec = {
        "name": "wide",
        "stages": [{"name": "a", "variants": [{"model": "m", "version": "v1"}]}, {"name": "b", "branches": branches}],
    }
    (tmp_path / "wide.yaml").write_text(yaml.safe_dump(spec))
    refused = control_plane.cli("apply", "-f", str(tmp_path / "wide.yaml"))
    assert refused.returncode == 1
    assert "Envoy refuses this pipeline's config: response body size is" in refused.stderr
    assert "maximum is 4096" in refused.stderr and "Traceback" not in refused.stderr
    assert control_plane.cli("get", "pipeline", "wide").returncode == 1  # nothing was written
    # The same shape with fewer keys is fine, and a weight change later needs no second look by Envoy.
    spec["stages"][1]["branches"] = branches[:8]  # type: ignore[index]
    (tmp_path / "wide.yaml").write_text(yaml.safe_dump(spec))
    assert control_plane.cli("apply", "-f", str(tmp_path / "wide.yaml")).returncode == 0


def test_history_keeps_the_newest_versions_and_a_pruned_one_is_not_found(control_plane: Any) -> None:
    control_plane.stop()
    control_plane.extra_args = [*control_plane.extra_args, "--keep-versions=3"]
    control_plane.start()
    with grpc.insecure_channel(control_plane.admin_addr) as channel:
        stub = pb_grpc.PipelineAdminStub(channel)
        for i in range(5):
            stub.Apply(pb.ApplyRequest(spec=spec_with_weights("kept", 10 + i, 1)))

    def versions() -> list[int]:
        done = control_plane.cli("history", "pipeline", "kept", "-o", "json")
        return [int(v["version"]) for v in json.loads(done.stdout)["items"]]

    assert versions() == [3, 4, 5]  # each new version dropped the one 3 back, in the same transaction
    gone = control_plane.cli("rollback", "pipeline", "kept", "--to-version", "1")
    assert gone.returncode == 1 and "has no version 1" in gone.stderr, gone.stderr
    assert control_plane.cli("rollback", "pipeline", "kept", "--to-version", "3").returncode == 0
    assert versions() == [4, 5, 6]
    refused = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "controlplane", "--keep-versions=1"], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "keep at least 2 versions" in refused.stderr
