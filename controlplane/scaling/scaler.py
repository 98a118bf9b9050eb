"""The autoscaler: one control plane decides (Consul lock), a backend carries the decision out.

Every decision is written to Consul KV, one record per model version
(`<prefix>-autoscale/<model>.<version>`): replicas wanted, why, when and by
whom. That record is the whole interface of the `local` backend: `mllambda up`
watches it and starts or stops runtimes. The `kubernetes` backend also sets
the replicas of the version's Deployment through its scale subresource.

Failure behaviour:
- A record that does not parse is ignored by its readers and overwritten by the
  next decision; it stops no other version.
- Consul away: no decision is written; replicas stay as they are.
- The lock lost: this control plane stops deciding; the next holder continues
  from the records (what was wanted) and watches a whole down window afresh.
- The Kubernetes API refusing: logged and retried on the next decision; the
  record still says what is wanted.

Policies come from the control plane's `--autoscale FILE` and from deploy
records (`mllambda deploy M:V --autoscale`, read every round: a new one starts
from what passes within its bounds; a changed one is held to its new bounds; one
undeployed or deployed at a fixed count takes its record with it, so the stack
stops following it). A version the file names keeps the file's policy. Without a
file, nothing takes the lock until a deploy asks for autoscaling.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import consul.aio

from contract.naming import model_cluster
from contract.service import RuntimeService
from controlplane.consul.lock import SessionLock, lead
from controlplane.delivery.traffic import ClusterStats, TrafficBook
from controlplane.models.store import Deployment, deploy_prefix, parse_deployment
from controlplane.scaling.activator import Activator
from controlplane.scaling.deployer import KubernetesDeployer, Render, apps_api
from controlplane.scaling.policy import (
    MAX_POLICIES,
    TICK,
    Decision,
    InvalidPolicy,
    Observation,
    Policy,
    Stabilizer,
    deployed_policy,
    load_policies,
)

if TYPE_CHECKING:
    from controlplane.settings import Settings

log = logging.getLogger("mllambda.autoscaler")
MAX_RECORD = 4096  # bytes: a record longer than this is not ours


@dataclass(frozen=True)
class ScaleRow:
    """One autoscaled model version: its bounds, what is wanted, what passes, and the last decision."""

    model: str
    version: str
    min_replicas: int
    max_replicas: int
    wanted: int | None  # None: no decision recorded yet
    passing: int
    reason: str = ""  # of the last decision ("": none recorded yet)
    decided_at: float | None = None  # unix time
    decided_by: str = ""
    cold_start_s: float | None = None  # scaled to zero: how long the last first request waited for a replica


@dataclass(frozen=True)
class ScaleRecord:
    model: str
    version: str
    replicas: int  # wanted
    reason: str
    at: float  # unix time of the decision
    by: str  # the control plane that decided


def demand_factor(asked: int, refused: int) -> float:
    """What the requests in flight stand for once the refused ones count as demand: in flight = admitted rate x
    latency (Little's law), so all of them would have kept asked / admitted times as many in flight (at most 10)."""
    if asked <= 0 or refused <= 0:
        return 1.0
    return min(10.0, asked / max(1, asked - refused))


def records_prefix(kv_prefix: str) -> str:
    return kv_prefix.rstrip("/") + "-autoscale/"


def record_key(kv_prefix: str, policy: Policy) -> str:
    return records_prefix(kv_prefix) + policy.cluster


def parse_record(raw: bytes | None) -> ScaleRecord | None:
    """A record as written, or None for anything else (absent, too long, not JSON, wrong shape)."""
    if raw is None or len(raw) > MAX_RECORD:
        return None
    try:
        data = json.loads(raw)
        record = ScaleRecord(
            str(data["model"]),
            str(data["version"]),
            data["replicas"],
            str(data["reason"])[:300],
            float(data["at"]),
            str(data["by"])[:200],
        )
    except (ValueError, KeyError, TypeError):
        return None
    ok = type(record.replicas) is int and 0 <= record.replicas <= 100 and 0 <= record.at < 1e10  # `status` dates it
    return record if ok else None


class Backend(Protocol):
    async def scale(self, policy: Policy, replicas: int) -> None: ...


class LocalBackend:
    """The record is the order: `mllambda up` reads it and starts or stops runtimes."""

    async def scale(self, policy: Policy, replicas: int) -> None:
        return None


def deployment_name(model: str, version: str) -> str:
    """The Deployment of one model version, as deploy/kubernetes names it (dots are allowed in its name)."""
    return f"runtime-{model}-{version}"


class KubernetesBackend:
    """Sets `spec.replicas` of the version's Deployment through its scale subresource (apps/v1)."""

    def __init__(self, namespace: str, api: Any = None) -> None:
        self.namespace = namespace
        self._api = api

    def api(self) -> Any:
        if self._api is None:
            self._api = apps_api()
        return self._api

    def request(self, policy: Policy, replicas: int) -> dict[str, Any]:
        """The call, as data: a merge patch of the Scale object's spec."""
        return {
            "name": deployment_name(policy.model, policy.version),
            "namespace": self.namespace,
            "body": {"spec": {"replicas": replicas}},
        }

    async def scale(self, policy: Policy, replicas: int) -> None:
        call = self.request(policy, replicas)
        await asyncio.to_thread(self.api().patch_namespaced_deployment_scale, **call)


class Autoscaler:
    def __init__(
        self,
        client: consul.aio.Consul,
        kv_prefix: str,
        policies: Sequence[Policy],
        instances: Callable[[], Sequence[RuntimeService]],
        stats: Callable[[], Awaitable[Mapping[str, ClusterStats]]],
        holder: str,
        backend: Backend,
        deployer: KubernetesDeployer | None = None,
    ) -> None:
        self.client = client
        self.deployer = deployer  # --scaler kubernetes: a Deployment per deployed version (scaling/deployer.py)
        self.deploy_records: list[Deployment] = []  # every deploy record that reads, as of the last round
        self.kv_prefix = kv_prefix
        self.static = tuple(policies)  # the --autoscale file's
        self.deployed: dict[str, Policy] = {}  # by cluster: the deploy records' (`deploy --autoscale`)
        self.policies = self.static
        self.unreadable: set[str] = set()  # deploy records whose policy does not parse (said once)
        self.instances = instances
        self.stats = stats
        self.holder = holder
        self.backend = backend
        self.lock = SessionLock(client, records_prefix(kv_prefix) + "decider", holder, "autoscaler")
        self.wanted: dict[str, int] = {}  # per cluster, while holding the lock
        self.records: dict[str, ScaleRecord] = {}  # the last decision per cluster (what status shows)
        self.unapplied: set[str] = set()  # clusters whose last decision the backend refused (tried again each tick)
        self._stabilizers: dict[str, Stabilizer] = {}
        self._requests: dict[str, int] = {}  # cluster -> requests counted at the last tick
        self._refused: dict[str, int] = {}  # ... and of them refused (429, 503)
        self.activator = Activator(self.policies, self.passing)
        self._since = 0.0

    def passing(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for i in self.instances():
            if i.passing:
                counts[i.cluster] = counts.get(i.cluster, 0) + 1
        return counts

    async def run(self) -> None:
        await self.activator.start()
        try:
            while not self._work():  # nothing to do (no file): the lock waits for a deploy that asks for something
                try:
                    await self._read_deployed(holding=False)
                except Exception as err:  # Consul away: as the lock's loop does, tried again
                    log.debug("deploy records not read: %s", err)
                await asyncio.sleep(0 if self._work() else 2 * TICK)
            await lead(self.lock, self._round)
        finally:
            await self.activator.stop()

    def _work(self) -> bool:
        """Something to decide (a policy), or Deployments to keep (deployed versions, on Kubernetes)."""
        return bool(self.policies or (self.deployer and self.deploy_records))

    async def _read_deployed(self, holding: bool) -> None:
        """The policies of deploy records; the holder begins new and changed ones and deletes the records of
        those gone (undeployed, or deployed at a fixed count), which the stack then stops following."""
        prefix = deploy_prefix(self.kv_prefix)
        _, items = await self.client.kv.get(prefix, recurse=True)
        static, found, records = {p.cluster for p in self.static}, dict[str, Policy](), []
        for item in items or []:
            record = parse_deployment(item.get("Value"))
            if record is None or item["Key"] != prefix + model_cluster(record.model, record.version):
                continue
            records.append(record)
            cluster = model_cluster(record.model, record.version)
            if record.autoscale is None or cluster in static or len(found) >= MAX_POLICIES:
                continue
            try:
                found[cluster] = deployed_policy(record.model, record.version, record.autoscale)
                self.unreadable.discard(cluster)
            except InvalidPolicy as err:
                if cluster not in self.unreadable:
                    log.warning("deploy record of %s: its autoscale policy does not read: %s", cluster, err)
                self.unreadable.add(cluster)
        changed = [p for c, p in found.items() if self.deployed.get(c) != p]
        gone = [c for c in self.deployed if c not in found]
        self.deployed, self.deploy_records = found, records
        self.policies = self.static + tuple(found[c] for c in sorted(found))
        if not holding:
            return
        if self.deployer is not None:
            await self.deployer.sync(records)
        for cluster in gone:
            self.wanted.pop(cluster, None)
            self.records.pop(cluster, None)
            self._stabilizers.pop(cluster, None)
            self.unapplied.discard(cluster)
            await self.client.kv.delete(records_prefix(self.kv_prefix) + cluster)
            log.info("cluster=%s no longer autoscaled (undeployed, or deployed at a fixed count)", cluster)
        if changed and self._since == self.lock.taken:  # (a take-over begins every policy)
            await self._read_records()
            passing, now = self.passing(), time.monotonic()
            for policy in changed:
                await self._begin(policy, passing, now)

    async def _round(self, holding: bool) -> float:
        await self._read_deployed(holding)
        if not holding:
            self._since = 0.0
            await self._read_records()  # for status on a control plane that does not decide
        else:
            if self._since != self.lock.taken:
                await self._take_over()
            await self._tick(time.monotonic())
        return TICK

    async def _read_records(self) -> None:
        _, items = await self.client.kv.get(records_prefix(self.kv_prefix), recurse=True)
        by_key = {item["Key"]: parse_record(item.get("Value")) for item in items or []}
        self.records = {
            p.cluster: r for p in self.policies if (r := by_key.get(record_key(self.kv_prefix, p))) is not None
        }

    async def _take_over(self) -> None:
        """Continue from what the last holder wanted; a missing or broken record starts from what passes."""
        await self._read_records()
        passing, now = self.passing(), time.monotonic()
        for p in self.policies:
            await self._begin(p, passing, now)
        self._since = self.lock.taken

    async def _begin(self, p: Policy, passing: Mapping[str, int], now: float) -> None:
        """Decide a policy from here: from its record (what was wanted, within its bounds), else what passes."""
        record = self.records.get(p.cluster)
        self.wanted[p.cluster] = p.clamp(record.replicas) if record else p.clamp(passing.get(p.cluster, 0))
        self._stabilizers[p.cluster] = Stabilizer(p, now)
        if record is None:
            await self._decide(p, Decision(self.wanted[p.cluster], "policy start: what passes now, within bounds"))
        elif record.replicas != self.wanted[p.cluster]:
            await self._decide(p, Decision(self.wanted[p.cluster], "policy changed: held to its new bounds"))

    async def _tick(self, now: float) -> None:
        stats, passing = await self.stats(), self.passing()
        for p in self.policies:
            if p.cluster in self.unapplied:
                await self._apply(p, self.wanted[p.cluster])
            s = stats.get(p.cluster, ClusterStats())
            asked = s.requests - self._requests.get(p.cluster, s.requests)
            refused = s.refused - self._refused.get(p.cluster, s.refused)
            self._requests[p.cluster], self._refused[p.cluster] = s.requests, s.refused
            demand = float(s.in_flight) * demand_factor(asked, refused)
            seen = Observation(demand, passing.get(p.cluster, 0), s.p99_recent_ms, asked != 0, refused > 0)
            decision = self._stabilizers[p.cluster].decide(now, self.wanted[p.cluster], seen)
            if decision is not None:
                await self._decide(p, decision)

    async def _decide(self, policy: Policy, decision: Decision) -> None:
        record = ScaleRecord(policy.model, policy.version, decision.replicas, decision.reason, time.time(), self.holder)
        key = record_key(self.kv_prefix, policy)
        await self.client.kv.put(key, json.dumps(asdict(record)))
        self.wanted[policy.cluster], self.records[policy.cluster] = decision.replicas, record
        log.info("model=%s version=%s replicas=%d %s", policy.model, policy.version, decision.replicas, decision.reason)
        await self._apply(policy, decision.replicas)

    async def _apply(self, policy: Policy, replicas: int) -> None:
        try:
            await self.backend.scale(policy, replicas)
        except Exception as err:  # the record stands; the next tick tries again
            if policy.cluster not in self.unapplied:
                log.warning("model=%s version=%s scaling refused: %s", policy.model, policy.version, str(err)[:300])
            self.unapplied.add(policy.cluster)
        else:
            self.unapplied.discard(policy.cluster)

    def report(self) -> tuple[ScaleRow, ...]:
        passing = self.passing()
        rows = []
        for p in self.policies:
            r = self.records.get(p.cluster)
            wanted, reason, at, by = (r.replicas, r.reason, r.at, r.by) if r else (None, "", None, "")
            rows.append(
                ScaleRow(
                    p.model,
                    p.version,
                    p.min_replicas,
                    p.max_replicas,
                    wanted,
                    passing.get(p.cluster, 0),
                    reason=reason,
                    decided_at=at,
                    decided_by=by,
                    cold_start_s=self.activator.cold_starts.get(p.cluster),
                )
            )
        return tuple(rows)


def autoscaler_from(
    settings: Settings,
    client: consul.aio.Consul,
    instances: Callable[[], Sequence[RuntimeService]],
    book: TrafficBook,
    holder: str,
    render: Render,
) -> Autoscaler:
    """The autoscaler: `--autoscale FILE`'s policies and deployed ones; on Kubernetes it also keeps a Deployment
    per deployed version (rendered by `render`). A bad file stops the start, named."""
    kubernetes = settings.scaler == "kubernetes"
    policies = load_policies(Path(settings.autoscale_file)) if settings.autoscale_file else ()
    if kubernetes and any(p.min_replicas == 0 for p in policies):
        raise ValueError(
            "min_replicas 0 works with --scaler local only: the activator that holds requests listens on the "
            "control plane's loopback, which Envoys on other hosts cannot reach"
        )
    backend: Backend = KubernetesBackend(settings.kubernetes_namespace) if kubernetes else LocalBackend()
    deployer = KubernetesDeployer(settings.kubernetes_namespace, render) if kubernetes else None
    return Autoscaler(client, settings.kv_prefix, policies, instances, book.stats, holder, backend, deployer)
