"""Replay through real Envoys and Consul: recorded requests into a candidate that takes no live traffic."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml

from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb
from controlplane._gen.mllambda.admin.v1 import admin_pb2_grpc as pb_grpc
from controlplane.admin.convert import spec_to_proto
from controlplane.pipeline.spec import parse_pipeline
from tests.helpers.components import passing
from tests.helpers.envoy import wait_for
from tests.helpers.pipelines import M, apply, pipeline, post, until_ok

TEXTS = ["one", "one two", "a b c", "the quick brown fox", "w x y z q"]


def replay(plane: Any, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    gateway = f"http://127.0.0.1:{plane.gateway_port}"
    full = {**os.environ, "MLLAMBDA_ADMIN_ADDR": plane.admin_addr, "MLLAMBDA_GATEWAY": gateway, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "replay", *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=120,
    )


def history(plane: Any, name: str) -> list[int]:
    found = plane.cli("history", "pipeline", name, "-o", "json")
    return [int(v["version"]) for v in json.loads(found.stdout)["items"]]


async def send(url: str, n: int, headers: dict[str, str] | None = None) -> list[tuple[int, Any, str]]:
    async with aiohttp.ClientSession(headers=headers or {}) as session:
        return list(await asyncio.gather(*(post(session, url, {"text": TEXTS[i % len(TEXTS)]}) for i in range(n))))


async def test_replay_compares_a_candidate_on_recorded_requests_and_live_traffic_never_sees_it(
    control_plane: Any, gateway: Any, start_runtime: Any, tmp_path: Path
) -> None:
    logs = tmp_path / "payloads"
    passing(
        start_runtime(f"{M}:tokenize", "tokenize", "v1", wait=False, extra=(f"--payload-log-dir={logs}",)),
        *(
            start_runtime(f"{M}:{t}", m, v, wait=False)
            for t, m, v in (
                ("count", "count", "v1"),
                ("score", "score", "v1"),
                ("score_v2", "score", "v2"),
                ("broken", "broken", "v1"),
            )
        ),
    )
    apply(control_plane, tmp_path, {**pipeline("rp"), "logging": {"percent": 100}})
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/rp"
    await until_ok(url, {"text": "warm up"})
    assert all(status == 200 for status, _, _ in await send(url, 200))
    log = logs / "rp.jsonl"
    for _ in range(50):  # the writer is behind the answers
        if len(log.read_text().splitlines()) >= 201:
            break
        await asyncio.sleep(0.1)
    recorded = len(log.read_text().splitlines())
    assert recorded == 201

    # A copy of the log with what a log may hold after a crash or a hand edit: each is skipped and counted.
    hostile = tmp_path / "hostile.jsonl"
    other = json.loads(log.read_text().splitlines()[0]) | {"pipeline": "other"}
    cut = json.loads(log.read_text().splitlines()[0]) | {"request": {"truncated": True, "bytes": 70000, "head": "x"}}
    hostile.write_text(
        log.read_text()
        + "not json at all\n[1, 2]\n"
        + json.dumps(other)
        + "\n"
        + json.dumps(cut)
        + "\n"
        + '{"pipeline": "rp", "status": 200, "request": {"text": "cut sh'
    )

    candidate = {
        **pipeline(
            "rp",
            variants=[
                {"model": "score", "version": "v1", "weight": 50},
                {"model": "score", "version": "v2", "weight": 50},
            ],
        )
    }
    (tmp_path / "candidate.yaml").write_text(yaml.safe_dump(candidate))

    async def live_during() -> list[tuple[int, Any, str]]:
        await asyncio.sleep(0.5)  # the replay's CLI starts meanwhile: live traffic beside a replay under way
        answers = await send(url, 100)
        forged = await send(url, 50, headers={"x-mll-replay": "0" * 32})  # a forged secret: live traffic
        return answers + forged

    report_file = tmp_path / "report.json"
    done, live = await asyncio.gather(
        asyncio.to_thread(
            replay,
            control_plane,
            "rp",
            "--candidate",
            str(tmp_path / "candidate.yaml"),
            "--log",
            str(hostile),
            "--rate",
            "100",
            "--report",
            str(report_file),
        ),
        live_during(),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_file.read_text())
    assert report["requests"] == 201 and report["failed"] == 0, report
    assert report["log"]["skipped"] == {
        "not JSON (corrupt or cut short)": 2,
        "not a record": 1,
        "another pipeline": 1,
        "request cut when logged (over 64 KiB)": 1,
    }, report["log"]
    chains = {c["chain"]: c for c in report["by_chain"]}
    assert set(chains) == {"same models", "score: score:v1 -> score:v2"}, chains
    assert chains["same models"]["equal_share"] == 1.0  # the stages that did not change answer as recorded
    assert chains["score: score:v1 -> score:v2"]["changed_share"] == 1.0  # v2 scores 10x
    assert 60 < chains["score: score:v1 -> score:v2"]["requests"] < 140
    assert list(report["changed_fields"]) == ["score"]
    assert "score: score:v1 -> score:v2" in done.stdout and "100.0%" in done.stdout

    # Live traffic never entered the candidate, a forged secret included; nothing was written to the pipeline.
    assert all(status == 200 for status, _, _ in live)
    assert {served for _, _, served in live} == {"tokenize=tokenize:v1, count=count:v1, score=score:v1"}
    assert history(control_plane, "rp") == [1]
    # The replay was not logged: the log grew by the live requests only.
    await wait_for(lambda: len(log.read_text().splitlines()) >= recorded + 150, timeout=10)  # the writer catches up
    assert len(log.read_text().splitlines()) == recorded + 150
    # The control plane keeps the report; the trial is gone (its secret enters the live version now).
    listed = replay(control_plane, "rp", "-o", "json")
    kept = json.loads(listed.stdout)
    assert kept["running"] == [] and kept["reports"][0]["id"] == report["id"]
    after = await send(url, 20, headers={"x-mll-replay": "0" * 32})
    assert {served for _, _, served in after} == {"tokenize=tokenize:v1, count=count:v1, score=score:v1"}

    # A candidate that fails every request: counted by reason, and the exit code says so.
    broken = {**pipeline("rp", variants=[{"model": "broken", "version": "v1"}])}
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    failing = replay(
        control_plane,
        "rp",
        "--candidate",
        str(tmp_path / "broken.yaml"),
        "--log",
        str(log),
        "--last",
        "30",
        "--rate",
        "100",
        "-o",
        "json",
    )
    assert failing.returncode == 1, failing.stderr
    failed = json.loads(failing.stdout)
    assert failed["requests"] == 30 and failed["failed_share"] == 1.0 and failed["failed_by"] == {"status 500": 30}

    # A candidate naming a model version nobody runs: refused before anything is pushed.
    absent = {**pipeline("rp", variants=[{"model": "score", "version": "v9"}])}
    (tmp_path / "absent.yaml").write_text(yaml.safe_dump(absent))
    refused = replay(control_plane, "rp", "--candidate", str(tmp_path / "absent.yaml"), "--log", str(log))
    assert refused.returncode != 0 and "no runtime: score:v9" in refused.stderr, refused.stderr
    # A pipeline without a log: the hint says how to get one.
    (tmp_path / "empty").mkdir()
    empty = {"MLLAMBDA_RUN_DIR": str(tmp_path / "empty"), "MLLAMBDA_STATE_DIR": str(tmp_path / "empty")}
    nolog = replay(control_plane, "rp", "--candidate", str(tmp_path / "candidate.yaml"), env=empty)
    assert nolog.returncode != 0 and "no payload log of pipeline 'rp'" in nolog.stderr, nolog.stderr
    assert history(control_plane, "rp") == [1]

    # A rollout of score:v2 that requires a replay within 5% changed: the newest replay naming score:v2
    # changed half of its answers, so the rollout rolls back before its first step, naming that replay.
    gate = {"candidate": {"model": "score", "version": "v2"}, "require_replay": {"max_changed": 0.05}}
    gated = pipeline("rp", variants=[{"model": "score", "version": "v1"}], rollout=gate)
    apply(control_plane, tmp_path, {**gated, "logging": {"percent": 100}})
    for _ in range(100):
        causes = json.loads(control_plane.cli("history", "pipeline", "rp", "-o", "json").stdout)["items"]
        if len(causes) == 3:
            break
        await asyncio.sleep(0.1)
    assert [int(c["version"]) for c in causes] == [1, 2, 3], causes
    assert causes[-1]["cause"].startswith(f"auto-rollback rp/score score:v2: replay {report['id']}: "), causes


async def test_one_replay_at_a_time_per_pipeline_and_a_lapsed_one_is_replaced(
    control_plane: Any, gateway: Any, three_stages: Any, tmp_path: Path
) -> None:
    apply(control_plane, tmp_path, pipeline("once"))
    url = f"http://127.0.0.1:{control_plane.gateway_port}/pipelines/once"
    await until_ok(url, {"text": "a"})
    candidate = spec_to_proto(parse_pipeline(pipeline("once")))
    async with grpc.aio.insecure_channel(control_plane.admin_addr) as channel:
        stub = pb_grpc.PipelineAdminStub(channel)
        first = await stub.StartReplay(pb.StartReplayRequest(candidate=candidate, ttl_seconds=10))
        with pytest.raises(grpc.aio.AioRpcError) as busy:
            await stub.StartReplay(pb.StartReplayRequest(candidate=candidate))
        assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION and first.id in str(busy.value.details())
        nope = spec_to_proto(parse_pipeline(pipeline("nope")))
        for bad, code in [
            (pb.StartReplayRequest(candidate=candidate, ttl_seconds=99_999), grpc.StatusCode.INVALID_ARGUMENT),
            (pb.StartReplayRequest(candidate=nope), grpc.StatusCode.NOT_FOUND),
            (pb.StartReplayRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.StartReplay(bad)
            assert refused.value.code() == code, refused.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.GetReplayState(pb.ReplayRef(pipeline="once", id="nope"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as not_json:
            await stub.EndReplay(pb.EndReplayRequest(pipeline="once", id=first.id, report_json="[1"))
        assert not_json.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for _ in range(100):  # the candidate's hops come, and its secret enters it
            state = await stub.GetReplayState(pb.ReplayRef(pipeline="once", id=first.id))
            if state.ready:
                break
            await asyncio.sleep(0.1)
        assert state.ready, state.waiting_for
        async with aiohttp.ClientSession(headers={"x-mll-replay": first.secret}) as session:
            status, _, served = await post(session, url, {"text": "a"})
        assert status == 200 and served == "tokenize=tokenize:v1, count=count:v1, score=score:v1"

        async def started_again() -> Any:  # refused while the first runs; once it lapses (10 s), another may start
            try:
                return await stub.StartReplay(pb.StartReplayRequest(candidate=candidate, ttl_seconds=30))
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
                return None

        second = await wait_for(started_again, timeout=30, every=0.5)
        assert second.id != first.id and second.version != first.version
        await stub.EndReplay(pb.EndReplayRequest(pipeline="once", id=second.id))
        listed = await stub.ListReplays(pb.ListReplaysRequest(pipeline="once"))
        assert list(listed.running) == [] and list(listed.reports_json) == []  # ended without a report
