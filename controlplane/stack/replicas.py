"""The `local` scaler: `mllambda up` starts and stops runtime replicas as the control plane decided.

The control plane writes one record per autoscaled model version to Consul KV
(controlplane/scaling/scaler.py); this reads them every half second and makes the
number of replica processes match. A new replica registers in Consul when it is
ready and gets traffic through EDS like any other; one that leaves gets
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from contract.naming import model_cluster
from controlplane.node import processes
from controlplane.scaling.scaler import parse_record, records_prefix
from controlplane.stack.file import RuntimeSpec

LEAVE_TIMEOUT = 60.0  # seconds a leaving replica may drain before SIGKILL


@dataclass
class Replicas:
    spec: RuntimeSpec
    running: dict[int, processes.ManagedProcess] = field(default_factory=dict)  # by replica index
    next_index: int = 0  # a new replica never reuses the service id of one still leaving


@dataclass
class LocalScaler:
    consul_port: int
    kv_prefix: str
    start: Callable[[RuntimeSpec, int], processes.ManagedProcess]  # starts replica i of a spec
    say: Callable[[str], None]
    versions: dict[str, Replicas] = field(default_factory=dict)  # by cluster (model.version)
    leaving: list[tuple[float, processes.ManagedProcess]] = field(default_factory=list)
    broken: set[str] = field(default_factory=set)  # keys whose record did not parse (said once)

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
            if key not in self.versions:
                continue
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

    def follow(self) -> tuple[bool, list[processes.ManagedProcess]]:
        """One pass: start or stop replicas to match the records. (Anything changed?, the replicas that left.)"""
        gone = self._reap()
        changed = False
        for cluster, replicas in self.wanted().items():
            have = self.versions[cluster]
            count = len(have.running)
            for _ in range(count, replicas):
                have.running[have.next_index] = self.start(have.spec, have.next_index)
                have.next_index += 1
            for index in sorted(have.running)[replicas:]:  # the newest leave first
                proc = have.running.pop(index)
                proc.signal(signal.SIGTERM)
                self.leaving.append((time.monotonic(), proc))
            if replicas != count:
                self.say(f"==> autoscale {cluster.replace('.', ':', 1)}: {count} -> {replicas} replicas")
                changed = True
        return changed, gone

    def _reap(self) -> list[processes.ManagedProcess]:
        for since, proc in self.leaving:
            if proc.alive() and time.monotonic() - since > LEAVE_TIMEOUT:
                proc.signal(signal.SIGKILL)
        gone = [proc for _, proc in self.leaving if not proc.alive()]
        self.leaving = [(since, proc) for since, proc in self.leaving if proc.alive()]
        return gone

    def is_leaving(self, proc: processes.ManagedProcess) -> bool:
        return any(p is proc for _, p in self.leaving)
