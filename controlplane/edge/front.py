"""The OIP gRPC front: `inference.GRPCInferenceService` served by each control plane, every call sent on to the
gateway's OIP over HTTP, so splits, size limits, replays and Kafka pipelines behave as they do for HTTP callers.

Gateways route `/inference.GRPCInferenceService/` on their own listener here (every passing front of the
deployment, found in Consul like the Kafka bridges), so a client dials the gateway for both protocols.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiohttp
import consul
import consul.aio
import grpc

from contract import oip
from contract.naming import FRONT_SERVICE
from contract.service import bridge_meta
from controlplane.consul.presence import Presence
from controlplane.edge import oip_grpc as t
from controlplane.edge.oip_grpc import Refused, pb

log = logging.getLogger("mllambda.edge")

# Caller metadata becomes headers the gateway sees (a request id, a trace, a token, a pipeline's fairness header
# such as x-tenant), but never what is the gateway's or gRPC's own: the gateway sets (and strips) x-mll-*.
NOT_FORWARDED = ("grpc-", "x-mll-", "x-envoy-", "x-forwarded-", ":")
NOT_FORWARDED_NAMES = frozenset(
    {"user-agent", "te", "content-type", "content-length", "host", "connection", "transfer-encoding", "upgrade"}
)
MAX_FORWARDED = 32  # metadata entries forwarded per call; the rest are dropped
MAX_CALLS = 1024  # calls in progress at once; one more is refused at once with RESOURCE_EXHAUSTED (gRPC's own limit)


def forwarded(metadata: Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
    """The caller's metadata as headers for the gateway: text values only (binary `-bin` entries stay), nothing
    reserved, at most MAX_FORWARDED. gRPC allows only printable ASCII in text values: no line break gets in."""
    found: dict[str, str] = {}
    for key, value in metadata:
        if len(found) >= MAX_FORWARDED:
            break
        if isinstance(value, str) and key not in NOT_FORWARDED_NAMES and not key.startswith(NOT_FORWARDED):
            found[key] = value
    return found


class OipFront:
    def __init__(self, address: tuple[str, int], gateway: str, client: consul.aio.Consul, kv_prefix: str) -> None:
        self.host, self.port = address
        self.gateway = gateway.rstrip("/")  # http://host:port of the gateway's listener
        check = consul.Check.tcp(self.host, self.port, interval="1s", timeout="1s", deregister="1m")
        service_id = f"{FRONT_SERVICE}-{self.host}-{self.port}"
        self.presence = Presence(client, FRONT_SERVICE, service_id, self.host, self.port, check, bridge_meta(kv_prefix))
        self._server: grpc.aio.Server | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> OipFront:
        from controlplane.listen import bind_grpc

        limits = [("grpc.max_receive_message_length", t.MAX_MESSAGE), ("grpc.max_send_message_length", t.MAX_MESSAGE)]
        self._server = grpc.aio.server(options=[*limits, ("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=MAX_CALLS)
        self._server.add_generic_rpc_handlers([self._handlers()])
        self.port = bind_grpc(self._server, f"{self.host}:{self.port}", "the OIP gRPC front")
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=MAX_CALLS), timeout=aiohttp.ClientTimeout(total=None)
        )
        await self._server.start()
        log.info("oip grpc at %s:%d (to the gateway at %s)", self.host, self.port, self.gateway)
        await self.presence.start()
        return self

    def _handlers(self) -> grpc.GenericRpcHandler:
        def unary(call: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], request: Any) -> Any:
            # Bytes in: a message that does not parse is the caller's mistake (INVALID_ARGUMENT), said as such.
            return grpc.unary_unary_rpc_method_handler(
                self._refusing(call, request), None, lambda m: m.SerializeToString()
            )

        return grpc.method_handlers_generic_handler(
            t.SERVICE,
            {
                "ServerLive": unary(self.server_live, pb.ServerLiveRequest),
                "ServerReady": unary(self.server_ready, pb.ServerReadyRequest),
                "ModelReady": unary(self.model_ready, pb.ModelReadyRequest),
                "ModelMetadata": unary(self.model_metadata, pb.ModelMetadataRequest),
                "ModelInfer": unary(self.model_infer, pb.ModelInferRequest),
            },
        )

    def _refusing(
        self, call: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], kind: Any
    ) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await call(t.parse(kind, raw), context)
            except Refused as err:
                await context.abort(err.code, str(err))
            except aiohttp.ClientError as err:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"the gateway at {self.gateway}: {err}")

        return handle

    async def _send(
        self, method: str, path: str, context: grpc.aio.ServicerContext, body: bytes = b"", length: int = 0
    ) -> tuple[int, bytes]:
        assert self._session is not None
        headers = forwarded(context.invocation_metadata() or ())
        if method == "POST":
            headers |= {"content-type": "application/octet-stream", oip.HEADER_LENGTH: str(length)}
        remaining = context.time_remaining()
        timeout = aiohttp.ClientTimeout(total=remaining) if remaining is not None else None
        async with self._session.request(
            method, self.gateway + path, data=body or None, headers=headers, timeout=timeout
        ) as resp:
            return resp.status, await resp.read()

    async def server_live(self, _: pb.ServerLiveRequest, __: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, _: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        status, _body = await self._send("GET", "/v2/health/ready", context)
        return pb.ServerReadyResponse(ready=status == 200)

    async def model_ready(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        status, _body = await self._send("GET", t.model_path(request.name) + "/ready", context)
        return pb.ModelReadyResponse(ready=status == 200)

    async def model_metadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        status, body = await self._send("GET", t.model_path(request.name), context)
        if status != 200:
            raise t.refusal(status, body) if status != 404 else _unknown(request.name)
        return t.metadata_response(body)

    async def model_infer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        path = t.model_path(request.model_name) + "/infer"
        body, length = t.infer_body(request)
        status, answer = await self._send("POST", path, context, body, length)
        if status != 200:
            raise t.refusal(status, answer)
        return t.infer_response(answer)

    async def deregister(self) -> None:
        await self.presence.stop()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=5)
        if self._session is not None:
            await self._session.close()


def _unknown(name: str) -> Refused:
    return Refused(grpc.StatusCode.NOT_FOUND, f"no pipeline {name!r} is served (mllambda get pipelines)")
