"""The `local` scaler: `mllambda up` starts and stops runtime replicas as the control plane decided.

The control plane writes one record per autoscaled model version to Consul KV
(controlplane/scaling/scaler.py), and one per deployed model package
(`mllambda deploy`, controlplane/models/store.py); this reads them every half
second and makes the number of replica processes match (a version deployed with
`--autoscale` follows the autoscaler's record, as a stack file's autoscaled
runtime does, until its deploy says otherwise). A deployed version that
the stack file does not name is started from its package in the store; its
record gone (`mllambda undeploy`), its replicas drain and stop. A deployed
replica that exits (its environment does not build, its model does not load) is
reported with its last lines and started again after a back-off that doubles
up to five minutes: never a tight loop, and the rest of the stack serves on.
What it reports is also written to Consul KV (`models.store.Trouble`), where
`describe model`, `get models` and the dashboard's models page read it; the
record goes once a replica has run a minute, or with the deployment.

A new replica registers in Consul when it is ready and gets traffic through EDS like any other; one that leaves gets
SIGTERM, which deregisters it and lets its requests finish (the runtime's
drain), and is SIGKILLed only if it has not gone after `LEAVE_TIMEOUT`.

A record that does not parse, or a Consul that does not answer, changes
nothing: the replicas that run keep running.
"""

from __future__ import annotations

import base64
import json
import signal
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from contract.naming import model_cluster
from controlplane.models.store import (
    MAX_TROUBLE_TEXT,
    Deployment,
    Trouble,
    deploy_prefix,
    parse_deployment,
    trouble_prefix,
)
from controlplane.node import processes
from controlplane.scaling.policy import InvalidPolicy, deployed_policy
from controlplane.scaling.scaler import parse_record, records_prefix
from controlplane.stack.file import RuntimeSpec

LEAVE_TIMEOUT = 60.0  # seconds a leaving replica may drain before SIGKILL
BACKOFF_FIRST, BACKOFF_MAX = 2.0, 300.0  # seconds before a failed deployed replica is started again


@dataclass
class Replicas:
    spec: RuntimeSpec
    running: dict[int, processes.ManagedProcess] = field(default_factory=dict)  # by replica index
    next_index: int = 0  # a new replica never reuses the service id of one still leaving
    failures: int = 0  # deployed replicas that exited in a row (reset once one has run for a minute)
    retry_at: float = 0.0  # monotonic: no replica starts before this


@dataclass
class LocalScaler:
    consul_port: int
    kv_prefix: str
    start: Callable[[RuntimeSpec, int], processes.ManagedProcess]  # starts replica i of a spec
    say: Callable[[str], None]
    versions: dict[str, Replicas] = field(default_factory=dict)  # by cluster (model.version)
    leaving: list[tuple[float, processes.ManagedProcess]] = field(default_factory=list)
    broken: set[str] = field(default_factory=set)  # keys whose record did not parse (said once)
    deployed: dict[str, int] = field(default_factory=dict)  # clusters with a deploy record -> replicas wanted
    autoscaled: set[str] = field(default_factory=set)  # ... of them, those deployed with a policy (`--autoscale`)
    started_at: dict[int, float] = field(default_factory=dict)  # pid -> monotonic start (deployed replicas)

    def adopt(self, spec: RuntimeSpec, running: Sequence[processes.ManagedProcess]) -> None:
        self.versions[model_cluster(spec.model, spec.version)] = Replicas(spec, dict(enumerate(running)), len(running))

    def wanted(self) -> dict[str, int]:
        """Replicas wanted per cluster, from the records that parse (Consul away, or nothing autoscaled: nothing)."""
        if not self.versions:
            return {}
        prefix = records_prefix(self.kv_prefix)
        url = f"http://127.0.0.1:{self.consul_port}/v1/kv/{prefix}?recurse=true"
        try:
            status, body = processes.http_get(url, timeout=2)
            items = json.loads(body) if status == 200 else []
        except (OSError, ValueError):
            return {}
        found = {}
        for item in items if isinstance(items, list) else []:
            key = str(item.get("Key", ""))[len(prefix) :]
            if key not in self.versions or self.versions[key].spec.autoscale is None:
                continue  # not autoscaled (any more): a record left behind is not followed
            raw = base64.b64decode(item["Value"]) if item.get("Value") else None
            record = parse_record(raw)
            if record is None or model_cluster(record.model, record.version) != key:
                if key not in self.broken:
                    self.say(f"    autoscale record for {key} is not readable: replicas stay as they are")
                self.broken.add(key)
                continue
            self.broken.discard(key)
            found[key] = record.replicas
        return found

    def deployments(self) -> dict[str, Deployment] | None:
        """Deploy records by cluster (None: Consul did not answer, so nothing changes)."""
        prefix = deploy_prefix(self.kv_prefix)
        url = f"http://127.0.0.1:{self.consul_port}/v1/kv/{prefix}?recurse=true"
        try:
            status, body = processes.http_get(url, timeout=2)
            items = json.loads(body) if status == 200 else [] if status == 404 else None
        except (OSError, ValueError):
            return None
        found = {}
        for item in items if isinstance(items, list) else []:
            raw = base64.b64decode(item["Value"]) if item.get("Value") else None
            record = parse_deployment(raw)
            key = str(item.get("Key", ""))[len(prefix) :]
            if record is not None and model_cluster(record.model, record.version) == key:
                found[key] = record
        return found if isinstance(items, list) else None

    def deploy_targets(self) -> dict[str, int]:
        """Replicas per deployed cluster; a version the stack file does not name is taken on from its package."""
        records = self.deployments()
        if records is None:
            return {}
        for cluster, record in records.items():
            if cluster not in self.versions:
                self.versions[cluster] = Replicas(RuntimeSpec(record.model, record.version, "", replicas=0))
            self.deployed[cluster] = record.replicas
            self._policy(cluster, record)
        for cluster in [c for c in self.deployed if c not in records]:
            del self.deployed[cluster]
            if cluster in self.autoscaled:  # its policy went with it: a scale record left behind is not followed
                self.autoscaled.discard(cluster)
                self.versions[cluster].spec = replace(self.versions[cluster].spec, autoscale=None)
            self._no_trouble(cluster)
            self._apply({cluster: 0}, "undeploy")
        return {c: n for c, n in self.deployed.items() if self.versions[c].spec.autoscale is None}

    def _policy(self, cluster: str, record: Deployment) -> None:
        """A deployed version autoscaled or not, as its record says (its replicas' admission follows the policy's
        target, as a stack file's runtime's does); a version the stack file autoscales keeps the file's policy."""
        have = self.versions[cluster]
        if cluster not in self.autoscaled and have.spec.autoscale is not None:
            return
        try:
            policy = deployed_policy(record.model, record.version, record.autoscale) if record.autoscale else None
        except InvalidPolicy:
            policy = None  # the control plane says so; its replicas stay as they are
        if policy is None:
            self.autoscaled.discard(cluster)
        else:
            self.autoscaled.add(cluster)
        if policy != have.spec.autoscale:
            have.spec = replace(have.spec, autoscale=policy)

    def follow(self) -> tuple[bool, list[processes.ManagedProcess]]:
        """One pass: start or stop replicas to match the records. (Anything changed?, the replicas that left.)"""
        gone = self._reap() + self._failed()
        changed = self._apply({**self.deploy_targets(), **self.wanted()})
        return changed or bool(gone), gone

    def _apply(self, targets: dict[str, int], why: str = "") -> bool:
        changed = False
        now = time.monotonic()
        for cluster, replicas in targets.items():
            have = self.versions[cluster]
            count = len(have.running)
            if replicas > count and now < have.retry_at:
                continue  # a deployed replica failed: not before its back-off ends
            for _ in range(count, replicas):
                proc = self.start(have.spec, have.next_index)
                have.running[have.next_index] = proc
                self.started_at[proc.pid] = now
                have.next_index += 1
            for index in sorted(have.running)[replicas:]:  # the newest leave first
                proc = have.running.pop(index)
                proc.signal(signal.SIGTERM)
                self.leaving.append((time.monotonic(), proc))
            if replicas != count:
                what = why or ("deploy" if cluster in self.deployed else "autoscale")
                self.say(f"==> {what} {cluster.replace('.', ':', 1)}: {count} -> {replicas} replicas")
                changed = True
        return changed

    def _failed(self) -> list[processes.ManagedProcess]:
        """Deployed replicas that exited by themselves: reported, and started again after a growing back-off."""
        gone = []
        now = time.monotonic()
        for cluster, have in self.versions.items():
            for index, proc in list(have.running.items()):
                if cluster not in self.deployed or proc.alive():
                    if proc.alive() and have.failures and now - self.started_at.get(proc.pid, now) > 60:
                        self._no_trouble(cluster)  # it has run for a while: the next failure starts the back-off anew
                    continue
                del have.running[index]
                self.started_at.pop(proc.pid, None)
                gone.append(proc)
                have.failures += 1
                wait = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (have.failures - 1))
                have.retry_at = now + wait
                tail = proc.tail(8)
                self.say(f"    {proc.name} exited ({have.failures} in a row); again in {wait:.0f}s:\n{tail}")
                spec = have.spec
                told = Trouble(
                    spec.model, spec.version, have.failures, tail[-MAX_TROUBLE_TEXT:], time.time(), time.time() + wait
                )
                self._kv("PUT", cluster, told.to_json())
        return gone

    def _no_trouble(self, cluster: str) -> None:
        if self.versions[cluster].failures:
            self.versions[cluster].failures = 0
            self._kv("DELETE", cluster)

    def _kv(self, method: str, cluster: str, data: bytes = b"") -> None:
        """Write or delete a trouble record; a Consul away is said and changes nothing else."""
        key = urllib.parse.quote(trouble_prefix(self.kv_prefix) + cluster)
        status = processes.http_send(f"http://127.0.0.1:{self.consul_port}/v1/kv/{key}", method, data)
        if status != 200:
            self.say(f"    could not record {cluster}'s replica trouble in Consul (HTTP {status or 'no answer'})")

    def owns(self, proc: processes.ManagedProcess) -> bool:
        """A replica of a deployed version: the scaler restarts it; its exit is not the stack's."""
        return any(p is proc for c in self.deployed for p in self.versions[c].running.values())

    def _reap(self) -> list[processes.ManagedProcess]:
        for since, proc in self.leaving:
            if proc.alive() and time.monotonic() - since > LEAVE_TIMEOUT:
                proc.signal(signal.SIGKILL)
        gone = [proc for _, proc in self.leaving if not proc.alive()]
        self.leaving = [(since, proc) for since, proc in self.leaving if proc.alive()]
        for proc in gone:
            self.started_at.pop(proc.pid, None)  # one entry per live replica, not per replica ever started
        return gone

    def is_leaving(self, proc: processes.ManagedProcess) -> bool:
        return any(p is proc for _, p in self.leaving)
