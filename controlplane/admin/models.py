"""ModelAdmin over gRPC: model packages in (a chunked upload), versions and deployments out.

The same server, token, TLS and status codes as PipelineAdmin: INVALID_ARGUMENT for a
bad name or package, NOT_FOUND, ALREADY_EXISTS for a version name that holds other
content, FAILED_PRECONDITION for a version in use, UNAVAILABLE for Consul or the store.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from contract.payload import flat
from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb
from controlplane._gen.mllambda.admin.v1 import admin_pb2_grpc as pb_grpc
from controlplane.admin.server import Context, NotServedYet, guard
from controlplane.config import cache_dir
from controlplane.models.envs import env_folder, env_python, prune_host
from controlplane.models.package import MAX_PACKAGE, read_member, read_meta
from controlplane.models.reference import BadReference, profile_window
from controlplane.models.store import (
    BadPackage,
    Deployment,
    InUse,
    ModelNotFound,
    ModelStore,
    ModelVersion,
    Trouble,
    check_names,
    read_blob,
)
from controlplane.monitoring.monitor import DEFAULT_THRESHOLD, KEEP_WINDOWS, POLL_SECONDS, Monitor, MonitorError
from controlplane.scaling.policy import InvalidPolicy, deployed_policy, policy_fields

log = logging.getLogger("mllambda.admin")

# pipeline in traffic -> the model versions it sends to (undeploy and delete refuse those)
ModelsInTraffic = Callable[[], Awaitable[dict[str, set[tuple[str, str]]]]]


def version_to_proto(
    version: ModelVersion, deployment: Deployment | None = None, trouble: Trouble | None = None
) -> Any:
    """As the admin API answers it; what a stack reported of its replicas only while it is deployed."""
    if deployment is not None and trouble is not None:
        told = pb.ReplicaTrouble(failures=trouble.failures, tail=trouble.tail, at=trouble.at, retry_at=trouble.retry_at)
    else:
        told = None
    autoscale = None
    if deployment is not None and deployment.autoscale:
        try:  # a record is read as the autoscaler reads it: one whose policy does not read shows none
            policy = deployed_policy(version.model, version.version, deployment.autoscale)
            autoscale = policy_fields(policy)
        except InvalidPolicy:
            pass
    return pb.ModelVersion(
        trouble=told,
        autoscale=pb.DeployAutoscale(**autoscale) if autoscale else None,
        model=version.model,
        version=version.version,
        digest=version.digest,
        size=version.size,
        python=version.python,
        entry=version.entry,
        loader=version.loader,
        lock_hash=version.lock_hash,
        dependencies=list(version.dependencies),
        requirements=list(version.requirements),
        files=list(version.files),
        file_count=version.file_count,
        description=version.description,
        created_at=version.created_at,
        created_by=version.created_by,
        replicas=deployment.replicas if deployment else 0,
        deployed=deployment is not None,
        format=version.format,
        signature_json=version.signature,
        environment_built=env_python(env_folder(cache_dir() / "envs", version.lock_hash)).exists(),
    )


def autoscale_fields(message: Any) -> dict[str, Any]:
    """A DeployAutoscale as a policy's fields: what it sets (the bounds always; the rest when given)."""
    fields = {"min_replicas": message.min_replicas, "max_replicas": message.max_replicas}
    optional = ("target_in_flight", "target_p99_ms", "up_window", "down_window")
    return fields | {k: getattr(message, k) for k in optional if message.HasField(k)}


WINDOW_LIMIT = int(KEEP_WINDOWS * POLL_SECONDS)  # a baseline window: at most the history kept


class ModelAdmin(pb_grpc.ModelAdminServicer):
    def __init__(self, store: ModelStore, in_traffic: ModelsInTraffic, limit: int = MAX_PACKAGE) -> None:
        self.store = store
        self.in_traffic = in_traffic  # async () -> set of (model, version) that pipelines in traffic use
        self.limit = limit
        self.calls: dict[tuple[str, str], int] = {}
        self.monitor: Monitor | None = None  # model monitoring (None: not on this control plane)
        self.cache = cache_dir()  # this host's unpacked packages and environments, pruned as versions go

    def _monitor(self) -> Monitor:
        if self.monitor is None:
            raise NotServedYet("this control plane does not monitor models")
        return self.monitor

    @guard
    async def SetBaseline(self, request: pb.SetBaselineRequest, context: Context) -> pb.MonitorStatusResponse:
        check_names(request.model, request.version)
        seconds = request.window_seconds or 300
        threshold = request.threshold if request.HasField("threshold") else DEFAULT_THRESHOLD
        if not 10 <= seconds <= WINDOW_LIMIT or not 0 < threshold < 100 or threshold != threshold:
            raise BadPackage(f"window_seconds: 10 to {WINDOW_LIMIT}; threshold: above 0 and below 100")
        if request.reference:
            window, source = await self._reference(request.model, request.version)
            await self._monitor().set_reference_baseline(request.model, request.version, window, threshold, source)
        else:
            await self._monitor().set_baseline(request.model, request.version, seconds, threshold)
        rows = self._monitor().status((request.model, request.version))
        return pb.MonitorStatusResponse(status_json=json.dumps(rows))

    async def _reference(self, model: str, version: str) -> tuple[dict[str, Any], str]:
        """The package's reference data profiled as one window, and where it came from."""
        record = await self.store.get(model, version)
        archive = await asyncio.to_thread(read_blob, self.store.dir, record.digest)
        name = read_meta(archive).reference
        if not name:
            raise MonitorError(
                f"model/{model}:{version} has no reference data: name a JSON-lines sample as `reference:` in its"
                " manifest and build it again, or take a window of traffic (--window)"
            )
        text = read_member(archive, name).decode("utf-8", errors="replace")
        try:
            return await asyncio.to_thread(profile_window, text), f"reference {name}"
        except BadReference as err:
            raise BadPackage(f"{name}: {err}") from err

    @guard
    async def GetMonitorStatus(self, request: pb.MonitorStatusRequest, context: Context) -> pb.MonitorStatusResponse:
        wanted = None
        if request.model:
            check_names(request.model, request.version)
            wanted = (request.model, request.version)
        return pb.MonitorStatusResponse(status_json=json.dumps(self._monitor().status(wanted)))

    @guard
    async def Upload(self, requests: AsyncIterator[pb.UploadChunk], context: Context) -> pb.UploadResponse:
        first = await anext(aiter(requests), None)
        if first is None:
            raise BadPackage("an upload needs a first message naming model, version and digest")
        check_names(first.model, first.version)
        await self.store.check_room(first.model, first.version)
        if first.size > self.limit:
            raise BadPackage(f"the package is {first.size} bytes, over the store's limit of {self.limit // 2**20} MiB")

        async def parts() -> AsyncIterator[bytes]:
            if first.data:
                yield first.data
            async for chunk in requests:
                yield chunk.data

        await self.store.receive(parts(), first.digest, self.limit)
        by = f"{flat(first.built_by, 100)} from {_caller(context)}" if first.built_by else _caller(context)
        version, created = await self.store.record(first.model, first.version, first.digest, by=by)
        log.info(
            "upload model=%s version=%s digest=%s created=%s",
            version.model,
            version.version,
            version.digest[:12],
            created,
        )
        deployment = await self.store.deployment(version.model, version.version)
        return pb.UploadResponse(model=version_to_proto(version, deployment), created=created)

    @guard
    async def GetModel(self, request: pb.ModelRef, context: Context) -> pb.ModelVersion:
        version = await self.store.get(request.model, request.version)
        deployment = await self.store.deployment(request.model, request.version)
        return version_to_proto(version, deployment, await self.store.trouble(request.model, request.version))

    @guard
    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        versions = await self.store.versions(request.model)
        deployed = {(d.model, d.version): d for d in await self.store.deployments()}
        troubles = await self.store.troubles()
        return pb.ListModelsResponse(
            models=[version_to_proto(v, deployed.get(key := (v.model, v.version)), troubles.get(key)) for v in versions]
        )

    @guard
    async def DeleteModel(self, request: pb.ModelRef, context: Context) -> pb.ModelVersion:
        await self._not_in_traffic(request.model, request.version, "delete")
        version = await self.store.delete(request.model, request.version)
        log.info("delete model=%s version=%s", version.model, version.version)
        left = await self.store.versions()
        digests, locks = {v.digest for v in left}, {v.lock_hash for v in left}
        for path in await asyncio.to_thread(prune_host, self.cache, digests, locks):
            log.info("pruned %s (no stored version uses it)", path)
        return version_to_proto(version)

    @guard
    async def Deploy(self, request: pb.DeployRequest, context: Context) -> pb.DeployResponse:
        replicas, autoscale = request.replicas, None
        if request.HasField("autoscale"):
            check_names(request.model, request.version)
            try:
                policy = deployed_policy(request.model, request.version, autoscale_fields(request.autoscale))
            except InvalidPolicy as err:
                raise BadPackage(str(err)) from None
            replicas, autoscale = policy.min_replicas, policy_fields(policy)
        version, deployment, changed = await self.store.deploy(
            request.model, request.version, replicas, _caller(context), autoscale
        )
        log.info(
            "deploy model=%s version=%s replicas=%d autoscale=%s changed=%s",
            request.model,
            request.version,
            replicas,
            json.dumps(autoscale, sort_keys=True),
            changed,
        )
        return pb.DeployResponse(model=version_to_proto(version, deployment), changed=changed)

    @guard
    async def Undeploy(self, request: pb.UndeployRequest, context: Context) -> pb.ModelVersion:
        check_names(request.model, request.version)
        if await self.store.deployment(request.model, request.version) is None:
            raise ModelNotFound(f"{request.model}:{request.version} is not deployed")
        if not request.force:
            await self._not_in_traffic(request.model, request.version, "undeploy")
        deployment = await self.store.undeploy(request.model, request.version)
        log.info("undeploy model=%s version=%s", request.model, request.version)
        return version_to_proto(await self.store.get(deployment.model, deployment.version))

    async def _not_in_traffic(self, model: str, version: str, what: str) -> None:
        users = sorted(name for name, models in (await self.in_traffic()).items() if (model, version) in models)
        if users:
            raise InUse(
                f"{model}:{version} serves pipeline(s) {', '.join(users)} in traffic; move them off it first"
                + (" (or --force)" if what == "undeploy" else "")
            )


def _caller(context: Any) -> str:
    """Who made a change, for the record: the peer's address (the bearer token is not an identity)."""
    try:
        return str(context.peer())[:200]
    except Exception:
        return "unknown"
