"""The model store: package archives in a folder by digest, their records in Consul KV beside pipelines.

Layout:
  <store dir>/sha256/<digest>.tar                 the archive, written whole (temp file, fsync, rename) or not at all
  KV <prefix>-models/<model>/<version>            {"digest": ..., "lock_hash": ..., "dependencies": [...], ...}
  KV <prefix>-deploy/<model>.<version>            {"replicas": N, ...}: what a running stack should serve

A version's record is created with check-and-set index 0 (only if absent), so two
uploads of one version cannot both win, and a version name never changes content:
the same digest again is "unchanged", another digest is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import consul
import consul.aio

from contract.naming import DEFAULT_KV_PREFIX, LABEL, VERSION, model_cluster, name_problem
from controlplane.models.package import MAX_PACKAGE, PackageError, PackageMeta, describe_lock, lock_hash, read_lock
from controlplane.models.package import read_meta as meta_of

MAX_DEPLOY_REPLICAS = 100
MAX_VERSIONS = 100  # versions one model may hold in the store; one more is refused until old ones are deleted
MAX_MODELS = 1_000  # models the store may hold
SHOWN_FILES = 200
MAX_SIGNATURE = 64 * 1024  # bytes of a signature kept in the version's record (Consul KV values are small)


class ModelNotFound(Exception):
    pass


class VersionTaken(Exception):
    """The version name already holds other content (a different digest)."""


class InUse(Exception):
    """The version is deployed, or a pipeline in traffic sends to it."""


class ModelStoreUnavailable(Exception):
    pass


class StoreFull(Exception):
    """The store holds as many models, or versions of this model, as it may; nothing was stored."""


class BadPackage(Exception):
    """The upload is not a package, does not match its digest, or is too large; nothing was stored."""


@dataclass(frozen=True)
class ModelVersion:
    model: str
    version: str
    digest: str
    size: int
    python: str
    entry: str
    loader: str
    lock_hash: str
    dependencies: tuple[str, ...]  # name==version, from the lock
    requirements: tuple[str, ...]  # as the author wrote them
    files: tuple[str, ...]  # the first SHOWN_FILES of the model's own files
    file_count: int
    description: str
    created_at: float
    created_by: str
    format: str = ""  # a saved model's library ("": code with an entry of its own)
    signature: str = ""  # its inputs and outputs as JSON (runtime_sdk/formats/signature.py), "" if unknown

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @staticmethod
    def from_json(raw: bytes) -> ModelVersion:
        data = json.loads(raw)
        for key in ("dependencies", "requirements", "files"):
            data[key] = tuple(data[key])
        return ModelVersion(**data)


@dataclass(frozen=True)
class Deployment:
    model: str
    version: str
    digest: str
    replicas: int  # autoscaled: where it starts (its min_replicas)
    at: float
    by: str
    autoscale: dict[str, Any] | None = None  # a policy's fields but model and version (scaling/policy.py reads it)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


def parse_deployment(raw: bytes | None) -> Deployment | None:
    """A deployment record as written, or None for anything else (absent, not JSON, wrong shape)."""
    if raw is None or len(raw) > 4096:
        return None
    try:
        data = json.loads(raw)
        found = Deployment(
            str(data["model"]),
            str(data["version"]),
            str(data["digest"]),
            data["replicas"],
            float(data["at"]),
            str(data["by"])[:200],
            data.get("autoscale"),
        )
    except (ValueError, KeyError, TypeError):
        return None
    policy = found.autoscale
    shaped = policy is None or (
        isinstance(policy, dict) and len(policy) <= 8 and all(type(v) in (int, float) for v in policy.values())
    )
    ok = shaped and type(found.replicas) is int and 0 <= found.replicas <= MAX_DEPLOY_REPLICAS
    return found if ok and name_problem(found.model, LABEL) is None else None


MAX_TROUBLE_TEXT = 2000  # characters of a failed replica's last lines kept in its trouble record


@dataclass(frozen=True)
class Trouble:
    """Why a deployed version's replicas do not stay up, as the stack that starts them saw it: written by the
    stack's scaler (stack/replicas.py) at each exit, deleted once a replica has run a minute or on undeploy."""

    model: str
    version: str
    failures: int  # exits in a row
    tail: str  # the last one's last lines (its environment's build error, or its model's load error)
    at: float  # unix time of the last exit
    retry_at: float  # unix time of the next start (the back-off)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


def trouble_prefix(kv_prefix: str) -> str:
    return kv_prefix.rstrip("/") + "-deploy-trouble/"


def parse_trouble(raw: bytes | None) -> Trouble | None:
    """A trouble record as the stack writes it, or None for anything else (absent, not JSON, wrong shape)."""
    if raw is None or len(raw) > 4 * MAX_TROUBLE_TEXT:
        return None
    try:
        data = json.loads(raw)
        found = Trouble(
            str(data["model"]),
            str(data["version"]),
            data["failures"],
            data["tail"],
            float(data["at"]),
            float(data["retry_at"]),
        )
    except (ValueError, KeyError, TypeError):
        return None
    ok = type(found.failures) is int and found.failures > 0 and isinstance(found.tail, str)
    times = all(0 <= t < 1e10 for t in (found.at, found.retry_at))  # a clock's reading (NaN and 1e300 are not)
    return found if ok and times and len(found.tail) <= MAX_TROUBLE_TEXT else None


def check_names(model: str, version: str) -> None:
    for what, value, rule in (("model", model, LABEL), ("version", version, VERSION)):
        problem = name_problem(value, rule)
        if problem is not None:
            raise BadPackage(f"{what}: {problem}")


def models_prefix(kv_prefix: str) -> str:
    return kv_prefix.rstrip("/") + "-models/"


def deploy_prefix(kv_prefix: str) -> str:
    return kv_prefix.rstrip("/") + "-deploy/"


def blob_path(store_dir: Path, digest: str) -> Path:
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise BadPackage(f"not a sha256 digest: {digest[:80]!r}")
    return store_dir / "sha256" / f"{digest}.tar"


def read_blob(store_dir: Path, digest: str) -> bytes:
    """The archive of a digest, checked: a truncated or changed file is refused, never served."""
    path = blob_path(store_dir, digest)
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise ModelNotFound(f"the store at {store_dir} has no package {digest[:12]} ({path})") from err
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise BadPackage(f"{path}: content does not match its digest (sha256 {actual[:12]}...): tampered or truncated")
    return data


def write_blob(store_dir: Path, digest: str, archive: bytes) -> Path:
    """Keep a fetched archive in this host's store by its digest (checked), whole or not at all."""
    if hashlib.sha256(archive).hexdigest() != digest:
        raise BadPackage(f"the fetched package does not match its record's digest {digest[:12]}: refused")
    target = blob_path(store_dir, digest)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{digest}.{os.getpid()}.{time.monotonic_ns()}")
    try:
        with partial.open("wb") as out:
            out.write(archive)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    except OSError as err:
        raise ModelStoreUnavailable(f"cannot write the package into {store_dir}: {err.strerror or err}") from err
    finally:
        partial.unlink(missing_ok=True)
    return target


class ModelStore:
    def __init__(
        self,
        client: consul.aio.Consul,
        store_dir: Path,
        kv_prefix: str = DEFAULT_KV_PREFIX,
        limits: tuple[int, int] = (MAX_MODELS, MAX_VERSIONS),
    ) -> None:
        self.client = client
        self.dir = store_dir
        self.prefix = models_prefix(kv_prefix)
        self.deploys = deploy_prefix(kv_prefix)
        self.trouble_keys = trouble_prefix(kv_prefix)
        self.max_models, self.max_versions = limits

    async def check_room(self, model: str, version: str) -> None:
        """StoreFull if recording model:version would pass the store's bounds (a version it holds always fits).
        Checked before an upload is received; two uploads at once may pass a bound by one."""
        check_names(model, version)
        existing = await self.versions()
        mine = {v.version for v in existing if v.model == model}
        if version in mine:
            return
        if len(mine) >= self.max_versions:
            raise StoreFull(
                f"model {model} has {len(mine)} versions, as many as the store keeps; delete ones no longer needed"
                f" (mllambda delete model {model}:VERSION) and upload again"
            )
        if not mine and len({v.model for v in existing}) >= self.max_models:
            raise StoreFull(f"the store holds {self.max_models} models, as many as it keeps; delete one first")

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            raise ModelStoreUnavailable(f"Consul unreachable: {err}") from err
        except consul.ConsulException as err:
            raise ModelStoreUnavailable(f"Consul error: {err}") from err

    def key(self, model: str, version: str) -> str:
        return f"{self.prefix}{model}/{version}"

    async def receive(self, parts: AsyncIterator[bytes], digest: str, limit: int = MAX_PACKAGE) -> Path:
        """An upload into the store, checked against its digest; the blob appears only when complete and right."""
        target = blob_path(self.dir, digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{digest}.{os.getpid()}.{time.monotonic_ns()}")
        hasher, size = hashlib.sha256(), 0
        try:
            with partial.open("wb") as out:
                async for part in parts:
                    size += len(part)
                    if size > limit:
                        raise BadPackage(f"the package is over the store's limit of {limit // 2**20} MiB")
                    hasher.update(part)
                    out.write(part)
                out.flush()
                os.fsync(out.fileno())
            if hasher.hexdigest() != digest:
                raise BadPackage(f"the upload does not match its digest ({size} bytes received): truncated or changed")
            os.replace(partial, target)
        except OSError as err:  # the disk full, say: nothing half-written stays
            raise ModelStoreUnavailable(f"cannot write the package into {self.dir}: {err.strerror or err}") from err
        finally:
            partial.unlink(missing_ok=True)
        return target

    async def record(self, model: str, version: str, digest: str, by: str) -> tuple[ModelVersion, bool]:
        """Record a received archive as model:version. (The version, created?) Same digest again: unchanged."""
        check_names(model, version)
        archive = read_blob(self.dir, digest)
        try:
            meta, lock_text = meta_of(archive), read_lock(archive)
        except (PackageError, ValueError, KeyError) as err:
            raise BadPackage(f"not a model package: {err}") from err
        found = await self._get(model, version)
        if found is not None:
            if found.digest != digest:
                raise VersionTaken(
                    f"{model}:{version} already holds package {found.digest[:12]}; this one is {digest[:12]}. "
                    "A version never changes content: build it as a new version"
                )
            return found, False
        new = _version_record(model, version, digest, len(archive), meta, lock_text, by)
        if not await self._call(self.client.kv.put(self.key(model, version), new.to_json().decode(), cas=0)):
            return await self.record(model, version, digest, by)  # someone recorded it meanwhile: judge theirs
        return new, True

    async def _get(self, model: str, version: str) -> ModelVersion | None:
        _, item = await self._call(self.client.kv.get(self.key(model, version)))
        if item is None or not item.get("Value"):
            return None
        try:
            return ModelVersion.from_json(item["Value"])
        except (ValueError, KeyError, TypeError) as err:
            raise BadPackage(f"{item['Key']}: not a model record ({err})") from err

    async def get(self, model: str, version: str) -> ModelVersion:
        check_names(model, version)
        found = await self._get(model, version)
        if found is None:
            raise ModelNotFound(f"model {model}:{version} not found (mllambda get models)")
        return found

    async def versions(self, model: str = "") -> list[ModelVersion]:
        if model:
            check_names(model, "v1")
        _, items = await self._call(self.client.kv.get(self.prefix + (f"{model}/" if model else ""), recurse=True))
        found = []
        for item in items or []:
            try:
                found.append(ModelVersion.from_json(item["Value"]))
            except (ValueError, KeyError, TypeError):
                continue  # a record that does not parse is not listed; `describe` names it
        return sorted(found, key=lambda v: (v.model, v.created_at, v.version))

    async def delete(self, model: str, version: str) -> ModelVersion:
        found = await self.get(model, version)
        deployed = await self.deployment(model, version)
        if deployed is not None:
            raise InUse(f"{model}:{version} is deployed ({deployed.replicas} replicas): `mllambda undeploy` it first")
        await self._call(self.client.kv.delete(self.key(model, version)))
        if not any(v.digest == found.digest for v in await self.versions()):
            blob_path(self.dir, found.digest).unlink(missing_ok=True)
        return found

    async def deployment(self, model: str, version: str) -> Deployment | None:
        _, item = await self._call(self.client.kv.get(self.deploys + model_cluster(model, version)))
        return parse_deployment(item["Value"]) if item else None

    async def trouble(self, model: str, version: str) -> Trouble | None:
        """Why its deployed replicas do not stay up (None: nothing reported, or a record that does not parse)."""
        _, item = await self._call(self.client.kv.get(self.trouble_keys + model_cluster(model, version)))
        found = parse_trouble(item["Value"]) if item else None
        return found if found is not None and (found.model, found.version) == (model, version) else None

    async def troubles(self) -> dict[tuple[str, str], Trouble]:
        _, items = await self._call(self.client.kv.get(self.trouble_keys, recurse=True))
        found = {}
        for item in items or []:
            record = parse_trouble(item.get("Value"))
            if record is not None and item["Key"] == self.trouble_keys + model_cluster(record.model, record.version):
                found[(record.model, record.version)] = record
        return found

    async def deployments(self) -> list[Deployment]:
        _, items = await self._call(self.client.kv.get(self.deploys, recurse=True))
        return [d for item in items or [] if (d := parse_deployment(item.get("Value"))) is not None]

    async def deploy(
        self, model: str, version: str, replicas: int, by: str, autoscale: dict[str, Any] | None = None
    ) -> tuple[ModelVersion, Deployment, bool]:
        """Write what should run (a number of replicas, or a checked autoscaling policy's fields); a running stack
        follows. (The version, the record, changed?)"""
        if not 0 <= replicas <= MAX_DEPLOY_REPLICAS:
            raise BadPackage(f"replicas: between 0 and {MAX_DEPLOY_REPLICAS}, got {replicas}")
        found = await self.get(model, version)
        key = self.deploys + model_cluster(model, version)
        _, item = await self._call(self.client.kv.get(key))
        before = parse_deployment(item["Value"]) if item else None
        if before is not None and (before.replicas, before.autoscale) == (replicas, autoscale):
            return found, before, False
        record = Deployment(model, version, found.digest, replicas, time.time(), by, autoscale)
        cas = int(item["ModifyIndex"]) if item else 0
        if not await self._call(self.client.kv.put(key, record.to_json().decode(), cas=cas)):
            raise InUse(f"{model}:{version} was deployed or changed by another client at the same time; try again")
        return found, record, True

    async def undeploy(self, model: str, version: str) -> Deployment:
        check_names(model, version)
        found = await self.deployment(model, version)
        if found is None:
            raise ModelNotFound(f"{model}:{version} is not deployed")
        await self._call(self.client.kv.delete(self.deploys + model_cluster(model, version)))
        await self._call(self.client.kv.delete(self.trouble_keys + model_cluster(model, version)))  # its stack's too
        return found


def _version_record(
    model: str, version: str, digest: str, size: int, meta: PackageMeta, lock_text: str, by: str
) -> ModelVersion:
    return ModelVersion(
        model=model,
        version=version,
        digest=digest,
        size=size,
        python=meta.python,
        entry=meta.entry,
        loader=meta.loader,
        lock_hash=lock_hash(lock_text, meta.python),
        dependencies=tuple(describe_lock(lock_text)),
        requirements=meta.requirements,
        files=meta.files[:SHOWN_FILES],
        file_count=len(meta.files),
        description=meta.description,
        created_at=time.time(),
        created_by=by[:200],
        format=meta.format,
        signature=_signature_text(meta.signature),
    )


def _signature_text(signature: dict[str, Any]) -> str:
    """The signature for the record; one too large (thousands of columns) is left to the package itself."""
    text = json.dumps(signature) if signature else ""
    return text if len(text) <= MAX_SIGNATURE else ""
