"""`mllambda deploy M:V --autoscale`: a deployed package's replicas follow load between its bounds.

The control plane's autoscaler takes the policy from the deploy record (no `--autoscale FILE`, no restart) and
writes its decisions; the stack's local scaler follows them. Both run here against a real Consul, the stack's
replicas being plain processes (what they run is not the point: how many run is).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from controlplane.delivery.traffic import ClusterStats
from controlplane.models.store import Deployment, deploy_prefix
from controlplane.node import processes
from controlplane.scaling.scaler import Autoscaler, records_prefix
from controlplane.stack.file import RuntimeSpec
from controlplane.stack.replicas import LocalScaler


class Recorded:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def scale(self, policy: Any, replicas: int) -> None:
        self.calls.append((policy.cluster, replicas))


async def test_a_deployed_version_follows_its_policy_and_stops_when_the_deploy_says_otherwise(
    consul_agent: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import consul.aio

    prefix = f"test-{uuid.uuid4().hex[:8]}"
    client = consul.aio.Consul(host="127.0.0.1", port=consul_agent.http_port)
    load = {"in_flight": 0}

    async def stats() -> dict[str, ClusterStats]:
        return {"echo.v1": ClusterStats(in_flight=load["in_flight"])}

    async def deploy(replicas: int, autoscale: dict[str, Any] | None) -> None:
        record = Deployment("echo", "v1", "0" * 64, replicas, time.time(), "test", autoscale)
        await client.kv.put(deploy_prefix(prefix) + "echo.v1", record.to_json().decode())

    async def scale_record() -> dict[str, Any] | None:
        _, item = await client.kv.get(records_prefix(prefix) + "echo.v1")
        return json.loads(item["Value"]) if item else None

    started: list[processes.ManagedProcess] = []

    def start(spec: RuntimeSpec, index: int) -> processes.ManagedProcess:
        proc = processes.ManagedProcess(f"echo-{index}", ["sleep", "300"], tmp_path / f"echo-{index}.log")
        started.append(proc.start())
        return proc

    stack = LocalScaler(consul_agent.http_port, prefix, start, lambda line: None)

    def running() -> int:
        stack.follow()
        have = stack.versions.get("echo.v1")
        return len(have.running) if have else 0

    async def until(test: Any, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not test():
            assert time.monotonic() < deadline, "condition not met in time"
            await asyncio.sleep(0.1)

    scaler = Autoscaler(client, prefix, [], lambda: [], stats, "cp-a", Recorded())
    task = asyncio.create_task(scaler.run())
    try:
        policy = {"min_replicas": 2, "max_replicas": 3, "target_in_flight": 1.0, "up_window": 0.2, "down_window": 1.0}
        await deploy(2, policy)
        await until(lambda: running() == 2)  # at its min, from the autoscaler's first decision
        assert (await scale_record() or {})["reason"].startswith("policy start"), await scale_record()
        # its replicas' admission follows the policy's target, as a stack file's autoscaled runtime's does
        assert stack.versions["echo.v1"].spec.runtime_args()[0] == "--max-in-flight=2"
        assert scaler.report()[0].max_replicas == 3  # what `status` shows under AUTOSCALED

        load["in_flight"] = 10
        await until(lambda: running() == 3)  # up to its max, not beyond
        load["in_flight"] = 0

        await deploy(2, {**policy, "min_replicas": 1, "max_replicas": 1})  # deployed again, with new bounds
        await until(lambda: running() == 1)
        assert "policy changed: held to its new bounds" in (await scale_record() or {})["reason"]

        caplog.set_level(logging.WARNING, "mllambda.autoscaler")
        await deploy(3, {"min_replicas": 4, "max_replicas": 2})  # not a policy (written by hand): not followed
        await until(lambda: "echo.v1" not in scaler.deployed and running() == 3)  # its count, as a fixed deploy
        assert "its autoscale policy does not read" in caplog.text and "max_replicas: 2 is below" in caplog.text

        await deploy(2, policy)
        await until(lambda: running() == 2 and stack.versions["echo.v1"].spec.autoscale is not None)
        await deploy(1, None)  # a fixed count: the policy and its scale record go
        await until(lambda: running() == 1)
        await until(lambda: "echo.v1" not in scaler.records)
        assert await scale_record() is None

        await client.kv.delete(deploy_prefix(prefix) + "echo.v1")  # undeployed
        await until(lambda: running() == 0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for proc in started:
            proc.stop()
        await client.kv.delete(prefix + "-", recurse=True)
        await client.close()


async def test_without_a_policy_file_the_autoscaler_takes_no_lock_until_a_deploy_asks(consul_agent: Any) -> None:
    import consul.aio

    prefix = f"test-{uuid.uuid4().hex[:8]}"
    client = consul.aio.Consul(host="127.0.0.1", port=consul_agent.http_port)

    async def stats() -> dict[str, ClusterStats]:
        return {}

    scaler = Autoscaler(client, prefix, [], lambda: [], stats, "cp-a", Recorded())
    task = asyncio.create_task(scaler.run())
    try:
        await asyncio.sleep(2.5)  # a wait for nothing to happen: rounds of reading deploy records go by

        async def lock_holder() -> str | None:  # the session that holds this prefix's decider lock
            _, item = await client.kv.get(records_prefix(prefix) + "decider")
            return item.get("Session") if item else None

        assert await lock_holder() is None and not scaler.lock.holding
        record = Deployment("echo", "v1", "0" * 64, 1, time.time(), "test", {"min_replicas": 1, "max_replicas": 2})
        await client.kv.put(deploy_prefix(prefix) + "echo.v1", record.to_json().decode())
        deadline = time.monotonic() + 15
        while not scaler.lock.holding:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert await lock_holder() is not None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.kv.delete(prefix + "-", recurse=True)
        await client.close()
