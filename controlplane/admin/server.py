"""PipelineAdmin over gRPC, with reflection and the standard health service.

Status codes: INVALID_ARGUMENT (every validation problem, with field paths),
NOT_FOUND, ABORTED (check-and-set lost too often), UNAVAILABLE (Consul down),
UNAUTHENTICATED (bearer token required and missing or wrong).
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb
from controlplane._gen.mllambda.admin.v1 import admin_pb2_grpc as pb_grpc
from controlplane.admin.convert import spec_from_proto, version_to_proto
from controlplane.admin.envoy_check import EnvoyRefuses, EnvoyValidator
from controlplane.delivery.replays import (
    DEFAULT_TTL,
    MAX_TTL,
    BadReport,
    ReplayBook,
    ReplayBusy,
    ReplayNotFound,
    ReplayUnavailable,
)
from controlplane.models.store import (
    BadPackage,
    InUse,
    ModelNotFound,
    ModelStoreUnavailable,
    StoreFull,
    VersionTaken,
)
from controlplane.monitoring.monitor import MonitorError
from controlplane.pipeline.contracts import Contracts
from controlplane.pipeline.contracts import coverage as contract_coverage
from controlplane.pipeline.contracts import problems as contract_problems
from controlplane.pipeline.model import InvalidPipeline, Pipeline, PipelineVersion, Problem
from controlplane.pipeline.spec import check_name
from controlplane.pipeline.store import (
    BrokenRecord,
    NotCurrent,
    PipelineNotFound,
    PipelineStore,
    StoreUnavailable,
    WriteConflict,
)
from controlplane.xds.acks import AckBook
from controlplane.xds.snapshot import ROUTE

log = logging.getLogger("mllambda.admin")
Context: TypeAlias = grpc.aio.ServicerContext  # what each method below is given beside its request
SERVICE = pb.DESCRIPTOR.services_by_name["PipelineAdmin"].full_name
MODEL_SERVICE = pb.DESCRIPTOR.services_by_name["ModelAdmin"].full_name
CAUSE_LIMIT = 200

# What the rest of the control plane tells the admin API (plain callables, so
# the API knows nothing about discovery or translation).
KnownModels = Callable[[], set[tuple[str, str]] | None]
# (node group, acknowledged config version, pipeline name) -> pipeline version inside it (0: none)
CarriedVersion = Callable[[str, str, str], int]
# pipeline name -> what its staged switch is waiting for or draining, as sentences
SwitchNotes = Callable[[str], list[str]]
# the contracts of the model versions a pipeline names (those without one left out)
ContractLookup = Callable[[Pipeline], Awaitable[Contracts]]
# (pipeline, replay id) -> what its trial waits for before requests may enter it ([]: ready)
TrialMissing = Callable[[str, str], list[str]]


class NotServedYet(Exception):
    """A valid definition this control plane cannot serve (yet)."""


_ERRORS: list[tuple[type[Exception], grpc.StatusCode]] = [
    (InvalidPipeline, grpc.StatusCode.INVALID_ARGUMENT),
    (EnvoyRefuses, grpc.StatusCode.FAILED_PRECONDITION),
    (NotServedYet, grpc.StatusCode.FAILED_PRECONDITION),
    (PipelineNotFound, grpc.StatusCode.NOT_FOUND),
    (WriteConflict, grpc.StatusCode.ABORTED),
    (NotCurrent, grpc.StatusCode.FAILED_PRECONDITION),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (BrokenRecord, grpc.StatusCode.FAILED_PRECONDITION),
    (BadPackage, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (VersionTaken, grpc.StatusCode.ALREADY_EXISTS),
    (InUse, grpc.StatusCode.FAILED_PRECONDITION),
    (StoreFull, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelStoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (ReplayBusy, grpc.StatusCode.FAILED_PRECONDITION),
    (ReplayNotFound, grpc.StatusCode.NOT_FOUND),
    (ReplayUnavailable, grpc.StatusCode.UNAVAILABLE),
    (BadReport, grpc.StatusCode.INVALID_ARGUMENT),
    (MonitorError, grpc.StatusCode.FAILED_PRECONDITION),
]


def guard(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Map domain errors to status codes; anything else is INTERNAL and logged."""

    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        outcome = grpc.StatusCode.OK
        try:
            return await method(self, request, context)
        except Exception as err:
            outcome = next((code for kind, code in _ERRORS if isinstance(err, kind)), grpc.StatusCode.INTERNAL)
            if outcome != grpc.StatusCode.INTERNAL:
                await context.abort(outcome, str(err))
            if isinstance(err, grpc.aio.AbortError):
                raise
            log.exception("admin %s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {err}")
        finally:
            key = (method.__name__, outcome.name)
            self.calls[key] = self.calls.get(key, 0) + 1

    wrapper.__name__ = method.__name__
    return wrapper


def _cause(cause: str) -> str:
    if len(cause) > CAUSE_LIMIT or not cause.isprintable():
        raise InvalidPipeline([Problem("cause", f"up to {CAUSE_LIMIT} printable characters")])
    return cause


def _required_name(name: str) -> str:
    """Validated before it goes near a KV key: `../other/pipelines/x` must not read outside the prefix."""
    return check_name(name)


class PipelineAdmin(pb_grpc.PipelineAdminServicer):
    def __init__(
        self,
        store: PipelineStore,
        acks: AckBook | None = None,
        known_models: KnownModels = lambda: None,
        carried_version: CarriedVersion = lambda group, version, name: 0,
        switch_notes: SwitchNotes = lambda name: [],
        contracts: ContractLookup | None = None,
    ) -> None:
        self.store = store
        self.acks = acks or AckBook()
        self.known_models = known_models
        self.carried_version = carried_version
        self.switch_notes = switch_notes
        self.contracts = contracts  # the contracts of model versions (from the model store), for Apply
        self.calls: dict[tuple[str, str], int] = {}  # (method, status code) -> count
        self.kafka_enabled = False
        self.validator = EnvoyValidator()
        self.replays: ReplayBook | None = None  # where trials and their reports live (None: no replays here)
        self.trial_missing: TrialMissing = lambda name, rid: ["a control plane that pushes replays"]

    def warnings(self, pipeline: Pipeline) -> list[str]:
        known = self.known_models()
        if known is None:
            return []
        return [
            f"model {model} version {version} is not registered (yet)"
            for model, version in sorted(pipeline.models() - known)
        ]

    @guard
    async def Apply(self, request: pb.ApplyRequest, context: Context) -> pb.ApplyResponse:
        pipeline = spec_from_proto(request.spec)
        if pipeline.transport == "kafka" and not self.kafka_enabled:
            raise NotServedYet("transport 'kafka' needs a Kafka broker: start the control plane with --kafka-bootstrap")
        cause = _cause(request.cause or "apply")
        await self.validator.check(pipeline)  # Envoy's own rules, before anything is written
        if self.contracts is not None:  # do the stages fit each other? (pipeline/contracts.py)
            wrong = contract_problems(pipeline, await self.contracts(pipeline))
            if wrong:
                raise InvalidPipeline(wrong)
        if request.dry_run:
            return await self._dry_run(pipeline, request.expect_version)
        version, created = await self.store.apply(pipeline, cause, expect=request.expect_version)
        log.info("apply pipeline=%s version=%d created=%s cause=%s", pipeline.name, version.version, created, cause)
        return pb.ApplyResponse(pipeline=version_to_proto(version), created=created, warnings=self.warnings(pipeline))

    async def _dry_run(self, pipeline: Pipeline, expect: int) -> pb.ApplyResponse:
        """What Apply would answer, nothing written: `created` says whether it would make a new version."""
        created = await self.store.would_create(pipeline, expect)
        would = PipelineVersion(pipeline, 0, "", "")
        return pb.ApplyResponse(pipeline=version_to_proto(would), created=created, warnings=self.warnings(pipeline))

    @guard
    async def Get(self, request: pb.GetRequest, context: Context) -> pb.GetResponse:
        version = await self.store.get(_required_name(request.name))
        return pb.GetResponse(pipeline=version_to_proto(version))

    @guard
    async def List(self, request: pb.ListRequest, context: Context) -> pb.ListResponse:
        view = await self.store.view()
        return pb.ListResponse(pipelines=[version_to_proto(v) for v in view.live()])

    @guard
    async def Delete(self, request: pb.DeleteRequest, context: Context) -> pb.DeleteResponse:
        version = await self.store.delete(_required_name(request.name))
        log.info("delete pipeline=%s version=%d", version.pipeline.name, version.version)
        return pb.DeleteResponse(pipeline=version_to_proto(version))

    @guard
    async def Rollback(self, request: pb.RollbackRequest, context: Context) -> pb.ApplyResponse:
        cause = _cause(request.cause) if request.cause else ""
        version, created = await self.store.rollback(_required_name(request.name), request.to_version, cause)
        log.info("rollback pipeline=%s version=%d cause=%s", request.name, version.version, cause)
        return pb.ApplyResponse(
            pipeline=version_to_proto(version),
            created=created,
            warnings=self.warnings(version.pipeline),
        )

    @guard
    async def History(self, request: pb.HistoryRequest, context: Context) -> pb.HistoryResponse:
        versions, older = await self.store.history(_required_name(request.name), request.limit, request.before)
        return pb.HistoryResponse(versions=[version_to_proto(v) for v in versions], next_before=older)

    @guard
    async def Status(self, request: pb.StatusRequest, context: Context) -> pb.StatusResponse:
        version = await self.store.get(_required_name(request.name))
        nodes = self._nodes(request.name)
        warnings = self.warnings(version.pipeline) + self.switch_notes(version.pipeline.name)
        found = await self.contracts(version.pipeline) if self.contracts is not None else {}
        return pb.StatusResponse(
            pipeline=version_to_proto(version),
            nodes=nodes,
            warnings=warnings,
            contracts=contract_coverage(version.pipeline, found),
        )

    def _replays(self) -> ReplayBook:
        if self.replays is None:
            raise NotServedYet("this control plane runs no replays")
        return self.replays

    @guard
    async def StartReplay(self, request: pb.StartReplayRequest, context: Context) -> pb.Replay:
        """A trial of the candidate beside the live version (delivery/replays.py); validated as Apply validates."""
        book = self._replays()
        candidate = spec_from_proto(request.candidate)
        if request.ttl_seconds > MAX_TTL:
            raise InvalidPipeline([Problem("ttl_seconds", f"at most {MAX_TTL:.0f}, got {request.ttl_seconds}")])
        await self.store.get(candidate.name)  # NOT_FOUND: a replay compares with what a live pipeline answered
        notes = []
        if candidate.transport == "kafka":  # nothing a replay does may reach an output topic
            candidate = dataclasses.replace(candidate, transport="http")
            notes.append("a kafka candidate is tried over http: the same models, no topic written")
        candidate = dataclasses.replace(candidate, log_percent=0)
        await self.validator.check(candidate)
        if self.contracts is not None:
            wrong = contract_problems(candidate, await self.contracts(candidate))
            if wrong:
                raise InvalidPipeline(wrong)
        known = self.known_models()
        absent = sorted(candidate.models() - known) if known is not None else []
        if absent:
            named = ", ".join(f"{m}:{v}" for m, v in absent)
            raise NotServedYet(f"the candidate names model versions with no runtime: {named} (deploy them first)")
        trial = await book.start(candidate, float(request.ttl_seconds or DEFAULT_TTL))
        return pb.Replay(
            pipeline=trial.name,
            id=trial.id,
            secret=trial.secret,
            version=trial.version.version,
            expires_at=trial.expires_at,
            notes=notes,
        )

    @guard
    async def GetReplayState(self, request: pb.ReplayRef, context: Context) -> pb.ReplayState:
        name = _required_name(request.pipeline)
        await self._replays().get(name, request.id)
        waiting = self.trial_missing(name, request.id)
        return pb.ReplayState(ready=not waiting, waiting_for=waiting[:20])

    @guard
    async def EndReplay(self, request: pb.EndReplayRequest, context: Context) -> pb.ReplayRef:
        name = _required_name(request.pipeline)
        report = None
        if request.report_json:
            try:
                report = json.loads(request.report_json)
            except ValueError as err:
                raise BadReport(f"report_json: not JSON ({err})") from err
            if not isinstance(report, dict):
                raise BadReport("report_json: a JSON object")
        await self._replays().end(name, request.id, report)
        return pb.ReplayRef(pipeline=name, id=request.id)

    @guard
    async def ListReplays(self, request: pb.ListReplaysRequest, context: Context) -> pb.ListReplaysResponse:
        name = _required_name(request.pipeline)
        view = await self._replays().view()
        running = [t for n, t in view.trials.items() if n == name]
        shown = [pb.Replay(pipeline=name, id=t.id, version=t.version.version, expires_at=t.expires_at) for t in running]
        return pb.ListReplaysResponse(reports_json=[json.dumps(r) for r in view.reports.get(name, [])], running=shown)

    def _nodes(self, name: str) -> list[pb.NodeStatus]:
        """Route configs carry pipelines: one row per Envoy, from its route config ACK/NACK."""
        return [
            pb.NodeStatus(
                node_id=s.node_id,
                type_url=s.type_url,
                acked_version=s.acked_version,
                nack_version=s.nack_version,
                nack_error=s.nack_error,
                pipeline_version=self.carried_version(s.group, s.acked_version, name),
            )
            for s in self.acks.all()
            if s.type_url == ROUTE
        ]


class BearerAuth(grpc.aio.ServerInterceptor):
    """Require `authorization: Bearer <token>` on every call when a token is set."""

    def __init__(self, token: str) -> None:
        self.expected = token.encode()

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        given = str(dict(details.invocation_metadata or ()).get("authorization", ""))
        scheme, _, credential = given.partition(" ")
        # The scheme is case-insensitive (RFC 7235); the token is compared exactly, in constant time.
        if scheme.lower() == "bearer" and hmac.compare_digest(credential.encode(), self.expected):
            return await continuation(details)

        async def deny(request: Any, context: Any) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        return grpc.unary_unary_rpc_method_handler(deny)


def add_admin_services(
    server: grpc.aio.Server, admin: PipelineAdmin, models: pb_grpc.ModelAdminServicer | None = None
) -> health.aio.HealthServicer:
    pb_grpc.add_PipelineAdminServicer_to_server(admin, server)
    if models is not None:
        pb_grpc.add_ModelAdminServicer_to_server(models, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE, MODEL_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return health_servicer


async def mark_serving(health_servicer: Any, serving: bool) -> None:
    state = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE):
        await health_servicer.set(name, state)
