"""The HTTP side of one model's predict() (served by wire.py): JSON in, JSON out, then on to the next hop."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from contract import headers as h
from contract import oip
from contract.fanout import FanOut
from contract.naming import STAGE_PATH, model_cluster
from contract.payload import MAX_BODY_CEILING, NotAnObject, encode, parse_object
from runtime_sdk.admission import KEY_CHARS, RETRY_AFTER, Admission, Refused, band, priority_of, weight_of
from runtime_sdk.batching import Batcher, BatchPolicy, Overloaded, PredictBatch
from runtime_sdk.egress import Egress
from runtime_sdk.ensemble import Answers, ask, ask_oip_stage, hop_headers
from runtime_sdk.entry import as_oip, log_payload, oip_payload
from runtime_sdk.errors import Rejected
from runtime_sdk.hop import HopError
from runtime_sdk.http1 import HttpError, Request, Response, json_response
from runtime_sdk.payload_log import PayloadLog, sampled
from runtime_sdk.profiles import Profiler
from runtime_sdk.wire import BODY_BUDGET, MAX_CONNECTIONS, Server

Predict = Callable[[dict[str, Any]], dict[str, Any] | Awaitable[dict[str, Any]]]
log = logging.getLogger("mllambda.runtime")


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model", "version", "code"]
        self.requests = Counter("mllambda_runtime_requests", "predict requests", labels, registry=registry)
        self.latency = Histogram(
            "mllambda_runtime_predict_seconds",
            "time in predict()",
            ["model", "version"],
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.batch_size = Histogram(
            "mllambda_runtime_batch_size",
            "requests per predict_batch() call (adaptive batching)",
            ["model", "version"],
            registry=registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.admission = Counter(
            "mllambda_runtime_admission",
            "HTTP requests into predict by priority band and outcome (admitted, shed, over share, saturated, waited"
            " too long)",
            ["model", "version", "priority", "outcome"],
            registry=registry,
        )
        self.by_caller = Counter(
            "mllambda_runtime_admission_by_caller",
            f"HTTP requests into predict by caller key and outcome: the first {MAX_CALLERS} callers seen by name, the"
            " rest as (other)",
            ["model", "version", "caller", "outcome"],
            registry=registry,
        )
        self.callers: dict[str, dict[str, int]] = {}  # caller label -> outcome -> count (GET /admission)
        self.body_bytes = Gauge(
            "mllambda_runtime_body_bytes_held",
            "bytes of request bodies held (being read, queued or answered): at most --body-budget, or one larger body",
            registry=registry,
        )
        self.body_waiting = Gauge(
            "mllambda_runtime_bodies_waiting",
            "requests whose body waits unread for room in --body-budget",
            registry=registry,
        )
        self.connections_refused = Counter(
            "mllambda_runtime_connections_refused",
            "connections reset at --max-connections, every one busy",
            registry=registry,
        )
        self.kafka_restarts = Counter(
            "mllambda_runtime_kafka_consumer_restarts",
            "Kafka consumers started again after they stopped (broker, rebalance)",
            ["topic"],
            registry=registry,
        )

    def count_caller(self, model: str, version: str, key: str, outcome: str) -> None:
        """One admission decision for a caller key, in /metrics and /admission. Bounded: the first MAX_CALLERS
        keys keep their name; the rest share "(other)"."""
        label = key[:KEY_CHARS] or "(none)"
        if label not in self.callers and len(self.callers) >= MAX_CALLERS:
            label = "(other)"
        outcomes = self.callers.setdefault(label, {})
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        self.by_caller.labels(model, version, label, outcome).inc()


MAX_CALLERS = 32  # caller keys named in the runtime's metrics
INLINE_BUDGET = 0.001  # seconds: a sync predict this fast runs on the event loop in `auto` mode
INLINE_AFTER = 50  # consecutive fast predicts (measured in threads) before `auto` goes inline


@dataclass
class Placement:
    """Where a sync predict() runs: on the event loop or in a worker thread.

    A thread hop costs ~50 us of CPU per request (docs/benchmarks.md), more than
    many small models take. `auto` measures each predict: after INLINE_AFTER
    in a row under INLINE_BUDGET it runs them on the loop; the first slower one
    sends it back to threads (so the loop is blocked at most once, for that call).
    `always` / `never` fix the choice.
    """

    mode: str = "auto"  # auto | always | never
    fast_in_a_row: int = 0

    @property
    def inline(self) -> bool:
        return self.mode == "always" or (self.mode == "auto" and self.fast_in_a_row >= INLINE_AFTER)

    def observe(self, seconds: float) -> None:
        self.fast_in_a_row = self.fast_in_a_row + 1 if seconds < INLINE_BUDGET else 0


@dataclass
class Runtime:
    predict: Predict
    model: str
    version: str
    egress: Egress = field(default_factory=Egress)
    ready: bool = False
    placement: Placement = field(default_factory=Placement)
    kafka_failing: dict[str, str] = field(default_factory=dict)  # topic -> why its consumer stopped (restarting)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    batch: BatchPolicy | None = None  # set: `predict` is predict_batch(list[dict]) -> list[dict], fed by a Batcher
    payload_log: PayloadLog | None = None  # where sampled requests go when this runtime is a pipeline's first stage
    admission: Admission | None = None  # HTTP requests into predict: places, priorities, fair shares (None: all)
    profiler: Profiler | None = None  # sampled profiles of the fields it sees and answers (GET /profiles)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.registry)
        self.latency = self.metrics.latency.labels(self.model, self.version)  # looked up once, not per request
        self.is_async = inspect.iscoroutinefunction(self.predict)
        self.batcher = None
        if self.batch is not None:
            sizes = self.metrics.batch_size.labels(self.model, self.version)
            predict_batch = cast(PredictBatch, self.predict)
            self.batcher = Batcher(predict_batch, self.batch, sizes.observe, self.latency.observe)

    async def start(self) -> None:
        await self.egress.start()

    async def close(self) -> None:
        await self.egress.close()
        if self.batcher is not None:
            await self.batcher.close()
        if self.payload_log is not None:
            await self.payload_log.close()

    @property
    def cluster(self) -> str:
        return model_cluster(self.model, self.version)

    async def call_model(self, payload: dict[str, Any]) -> dict[str, Any]:
        if self.batcher is not None:
            result = await self.batcher.submit(payload)
        elif self.is_async:
            started = time.perf_counter()
            try:
                result = await self.predict(payload)  # type: ignore[misc]
            finally:
                self.latency.observe(time.perf_counter() - started)
        elif self.placement.inline:
            result = self._timed_predict(payload)
        else:
            # A model's predict is CPU work: off the event loop unless it is known to be quick.
            result = await asyncio.to_thread(self._timed_predict, payload)
        if not isinstance(result, dict):
            raise TypeError(f"predict() returned {type(result).__name__}, expected a JSON object (dict)")
        if self.profiler is not None:
            self.profiler.offer(payload, result)
        return result

    @asynccontextmanager
    async def admitted(self, headers: Mapping[str, str]) -> AsyncIterator[None]:
        """One HTTP request in predict, admitted by its priority and caller (admission.py; Refused otherwise),
        so that no backlog builds up where every request would wait until its caller gives up."""
        if self.admission is None:
            yield
            return
        key, priority = headers.get(h.CALLER, ""), priority_of(headers.get(h.PRIORITY))
        try:
            await self.admission.enter(key, priority, weight_of(headers.get(h.SHARE)))
        except Refused as refused:
            self.metrics.admission.labels(self.model, self.version, band(priority), refused.shed).inc()
            self.metrics.count_caller(self.model, self.version, key, refused.shed)
            raise
        self.metrics.admission.labels(self.model, self.version, band(priority), "admitted").inc()
        self.metrics.count_caller(self.model, self.version, key, "admitted")
        try:
            yield
        finally:
            self.admission.leave(key)

    def _timed_predict(self, payload: dict[str, Any]) -> Any:
        started = time.perf_counter()
        try:
            return self.predict(payload)
        finally:
            took = time.perf_counter() - started
            self.placement.observe(took)
            self.latency.observe(took)


def _error(message: str, **extra: Any) -> str:
    return json.dumps({"error": message, **extra})


def read_payload(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it (wire.py refused one too large)."""
    if request.headers.get(h.PROTOCOL) == oip.PROTOCOL:  # the gateway's OIP route: tensors in
        try:
            return oip_payload(request, request.body)
        except oip.BadRequest as err:
            raise HttpError(400, str(err)) from err
    try:
        return parse_object(request.body)
    except NotAnObject as err:
        raise HttpError(400, str(err)) from err


async def handle_predict(runtime: Runtime, request: Request) -> Response:
    started = time.perf_counter()
    response = as_oip(request, await predict_and_forward(runtime, request))
    if runtime.payload_log is not None and h.LOG in request.headers and sampled(request.headers[h.LOG]):
        await log_payload(runtime.payload_log, request, response, started)
    return response


async def predict_and_forward(runtime: Runtime, request: Request) -> Response:
    served = f"{request.headers.get(h.STAGE, 'direct')}={runtime.model}:{runtime.version}"
    code = 200
    arrived = time.perf_counter()
    try:
        if not runtime.ready:  # started again under its identity and reachable before its loader ran, or stopping
            code = 503
            refusal = {"error": f"model {runtime.model}:{runtime.version} is not ready (loading, or stopping)"}
            return json_response(refusal, 503, {h.SERVED: served, h.RETRIABLE: "1", "retry-after": str(RETRY_AFTER)})
        payload = read_payload(request)
        fan = fan_out_of(request)
        ask_path = request.headers.get(h.ASK) if not request.headers.get(h.SHADOW) else None
        if ask_path is not None and not STAGE_PATH.fullmatch(ask_path):
            raise HttpError(400, f"{h.ASK} is not a stage path")
        try:
            model_started = time.perf_counter()
            async with runtime.admitted(request.headers):
                output = await runtime.call_model(payload)
            model_ms = (time.perf_counter() - model_started) * 1000
            if runtime.profiler is not None and h.AGREE in request.headers:
                runtime.profiler.answer(request.headers.get("x-request-id", ""), output)
        except Rejected as err:
            code = err.status
            return _json_response({"error": str(err), "model": runtime.model}, code, served)
        except Overloaded as err:  # this hop's own failure: another replica may take it (x-mll-retriable)
            code = 503
            refusal = {"error": f"model {runtime.model}:{runtime.version} is overloaded: {err}"}
            return json_response(refusal, 503, {h.SERVED: served, h.RETRIABLE: "1"})
        except Refused as err:  # admission: shed, over its share, or saturated (only that one is retriable)
            code = err.status
            refusal = {"error": f"model {runtime.model}:{runtime.version}: {err}", "refused": err.shed}
            said = {h.SERVED: served, "retry-after": str(RETRY_AFTER), **({h.RETRIABLE: "1"} if err.retriable else {})}
            return json_response(refusal, code, said)
        except Exception as err:
            code = 500
            return _failed(runtime, served, err, "predict() raised")
        try:
            body = encode(output)
        except (TypeError, ValueError, RecursionError) as err:
            code = 500
            return _failed(runtime, served, err, "predict() returned what JSON cannot hold")
        if ask_path is not None:
            asked = await ask_oip_stage(runtime.egress, request.headers, ask_path, output)
            served = ", ".join(x for x in (served, asked.served) if x)
            if asked.output is None:
                code = asked.status
                return _json_response({"error": asked.reason}, code, served)
            output, body = asked.output, encode(asked.output)
        if fan is not None:
            answers = await ask_members(runtime, request, fan, body, output)
            served = ", ".join([served, *answers.served])
            if answers.merged is None:
                code = answers.status
                stage = request.headers.get(h.FANOUT_PATH, "").rsplit("/", 1)[-1]
                message = f"ensemble {stage!r}: required member {answers.failed!r} failed: {answers.reason}"
                return _json_response({"error": message, "member": answers.failed}, code, served)
            output, body = answers.merged, encode(answers.merged)
        next_path = request.headers.get(h.NEXT)
        label = request.headers.get(h.STAGE, "direct")
        if not next_path or request.headers.get(h.SHADOW):
            timing = hop_timing(label, model_ms, arrived, None)
            return Response(200, body, {"content-type": "application/json", h.SERVED: served, h.TIMING: timing})
        if not STAGE_PATH.fullmatch(next_path):  # only ever a path on the own sidecar's egress
            code = 400
            return _json_response({"error": f"{h.NEXT} is not a stage path"}, 400, served)
        response, next_ms = await forward(runtime, request, body, output, next_path, served)
        own = hop_timing(label, model_ms, arrived, next_ms)
        response.headers[h.TIMING] = ", ".join(x for x in (own, response.headers.get(h.TIMING)) if x)
        code = response.status
        return response
    except HttpError as err:
        code = err.response.status
        raise
    except asyncio.CancelledError:  # the caller hung up (wire.py): nothing more is done for it
        code = 499
        raise
    finally:
        runtime.metrics.requests.labels(runtime.model, runtime.version, str(code)).inc()


def fan_out_of(request: Request) -> FanOut | None:
    """The ensemble the steering headers say to ask after predict (None: none); a 400 for a forged one."""
    headers = request.headers
    if h.FANOUT not in headers or headers.get(h.SHADOW):
        return None
    try:
        return FanOut.parse(headers.get(h.FANOUT_PATH, ""), headers[h.FANOUT], headers.get(h.FANOUT_BRANCH_FIELD, ""))
    except ValueError as err:
        raise HttpError(400, f"{h.FANOUT}: {err}") from err


async def ask_members(runtime: Runtime, request: Request, fan: FanOut, body: bytes, output: dict[str, Any]) -> Answers:
    """Every member of the ensemble, asked through the egress at once."""
    return await ask(runtime.egress, request.headers.get(h.TRANSPORT, "http"), fan, body, request.headers, output)


def _failed(runtime: Runtime, served: str, err: BaseException, what: str) -> Response:
    """A stable answer for a model failure; the detail (exception text, traceback) only in the runtime's log."""
    error_id = uuid.uuid4().hex[:16]
    log.error("error_id=%s model=%s:%s %s", error_id, runtime.model, runtime.version, what, exc_info=err)
    message = f"model {runtime.model}:{runtime.version} failed ({type(err).__name__}); see its log for error_id"
    return _json_response({"error": message, "error_id": error_id}, 500, served)


def hop_timing(label: str, model_ms: float, arrived: float, next_ms: float | None) -> str:
    """This hop's x-mll-timing entry: `stage=model/runtime/next` in ms (runtime: all of this request here;
    next: the call to the next hop, its sidecars and all after it, as this runtime waited for it)."""
    total_ms = (time.perf_counter() - arrived) * 1000
    return f"{label}={model_ms:.2f}/{total_ms:.2f}/" + ("-" if next_ms is None else f"{next_ms:.2f}")


async def forward(
    runtime: Runtime, request: Request, body: bytes, output: dict[str, Any], next_path: str, served: str
) -> tuple[Response, float | None]:
    """Send the output to the next hop (Egress.post); relay its answer (and how long it took)."""
    outgoing = hop_headers(request.headers, output, request.headers.get(h.BRANCH_FIELD, ""))
    sent = time.perf_counter()
    try:
        answer = await runtime.egress.post(request.headers.get(h.TRANSPORT, "http"), next_path, body, outgoing)
    except HopError as err:
        return _json_response({"error": f"next hop {next_path} unreachable: {err}"}, 503, served), None
    status, answered = answer.status, answer.headers
    downstream = answered.get(h.SERVED)
    content_type = answered.get("content-type", "application/json")
    timing = answered.get(h.TIMING, "")
    next_ms = (time.perf_counter() - sent) * 1000
    chain = f"{served}, {downstream}" if downstream else served
    headers = {h.SERVED: chain, "content-type": content_type, h.TIMING: timing}
    if "retry-after" in answered:  # a stage further on refused it (admission): the caller learns when to come back
        headers["retry-after"] = answered["retry-after"]
    return Response(status, answer.body, headers), next_ms


def _json_response(body: dict[str, Any], status: int, served: str) -> Response:
    return json_response(body, status, {h.SERVED: served})


def readiness(runtime: Runtime) -> tuple[int, dict[str, Any]]:
    """The readiness answer (status, body), for the app's /readyz and the health listener alike."""
    body: dict[str, Any] = {"ready": runtime.ready, "model": runtime.model, "version": runtime.version}
    if runtime.kafka_failing:  # reported; HTTP traffic is still served, so the instance stays ready
        body["kafka_consumers_restarting"] = dict(runtime.kafka_failing)
    return (200 if runtime.ready else 503), body


def answer_get(runtime: Runtime, path: str, query: str = "") -> Response | None:
    """GET /healthz, /readyz, /metrics, /profiles?after=<window id>, /admission (None: no such page)."""
    if path == "/admission":  # what admission decided per caller key since this runtime started
        callers = runtime.metrics.callers if runtime.admission is not None else {}
        return json_response({"model": runtime.model, "version": runtime.version, "callers": callers})
    if path == "/profiles":
        if runtime.profiler is None:
            return json_response({"error": "profiling is off (--profile-percent 0)"}, 404)
        after = query.removeprefix("after=")
        if query and not (query.startswith("after=") and after.isdigit() and len(after) < 16):
            return json_response({"error": "the query is after=<window id>"}, 400)
        exported = runtime.profiler.export(int(after or 0))
        return json_response({"model": runtime.model, "version": runtime.version, **exported})
    if path == "/healthz":
        return json_response({"live": True})
    if path == "/readyz":
        status, body = readiness(runtime)
        return json_response(body, status)
    if path == "/metrics":
        return Response(200, generate_latest(runtime.registry), {"content-type": CONTENT_TYPE_LATEST})
    return None


def build_app(
    runtime: Runtime,
    max_body: int = MAX_BODY_CEILING,
    access_log: logging.Logger | None = None,
    max_connections: int = MAX_CONNECTIONS,
    body_budget: int = BODY_BUDGET,
) -> Server:
    """predict on POST /predict and /pipelines/..., health and metrics on GET; listen with its `listen_*`.
    Requests the server refuses before predict (malformed, too large) count with their status."""

    async def route(request: Request) -> Response:
        if request.path == "/predict" or request.path.startswith("/pipelines/"):
            if request.method != "POST":
                return json_response({"error": "use POST"}, 405, {"allow": "POST"})
            return await handle_predict(runtime, request)
        page = answer_get(runtime, request.path, request.query)
        if page is None:
            return json_response({"error": f"no page {request.path[:200]}"}, 404)
        if request.method != "GET":
            return json_response({"error": "use GET"}, 405, {"allow": "GET"})
        return page

    def refused(what: str) -> None:
        if what == "connections":
            runtime.metrics.connections_refused.inc()
        else:
            runtime.metrics.requests.labels(runtime.model, runtime.version, what).inc()

    server = Server(route, max_body, access_log, max_connections, refused, body_budget=body_budget)
    runtime.metrics.body_bytes.set_function(lambda: server.held)
    runtime.metrics.body_waiting.set_function(lambda: len(server.waiting))
    return server


@asynccontextmanager
async def serving(runtime: Runtime, max_body: int = MAX_BODY_CEILING) -> AsyncIterator[str]:
    """The runtime served on a free loopback port while the block runs (its URL): for a model's own tests."""
    server = build_app(runtime, max_body)
    await runtime.start()
    runtime.ready = True
    try:
        port = await server.listen_tcp("127.0.0.1", 0)
        yield f"http://127.0.0.1:{port}"
    finally:
        await server.stop(1.0)
        await runtime.close()
