"""The Kafka HTTP bridge: HTTP in, Kafka through the pipeline, HTTP out.

The gateway routes a Kafka pipeline's requests here. Every control plane with
a broker runs one on its own listen address (`--bridge`) and registers it in
Consul (`BRIDGE_SERVICE`, with its KV prefix), so gateways spread bridge
requests over all of them and retry another when one dies.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Awaitable, Callable

import consul
import consul.aio
from aiohttp import web

from contract import headers as h
from contract import oip
from contract.naming import BRIDGE_SERVICE, GATEWAY_IDENTITY, bridge_service_id, identity_of
from contract.payload import MAX_BODY_CEILING, NotAnObject, parse_object
from contract.service import bridge_meta
from controlplane.consul.presence import Presence
from controlplane.kafka.plane import KafkaPlane
from controlplane.pipeline.model import Pipeline

log = logging.getLogger("mllambda.kafka")


def build_bridge_app(kafka: KafkaPlane, live_pipeline: Callable[[str], Pipeline | None]) -> web.Application:
    async def bridge(request: web.Request) -> web.Response:
        name = request.match_info["pipeline"]
        pipeline = live_pipeline(name)
        if pipeline is None:
            return web.json_response({"error": f"no Kafka pipeline named {name!r}"}, status=404)
        body, request_id = await request.read(), ""
        speaks_oip = request.headers.get(h.PROTOCOL) == oip.PROTOCOL
        try:
            if speaks_oip:
                payload, request_id = oip.decode_request(body, request.headers.get(oip.HEADER_LENGTH))
                body = json.dumps(payload).encode()
            else:
                parse_object(body)
        except (NotAnObject, oip.BadRequest) as err:
            return web.json_response({"error": str(err)}, status=400)
        status, result, served = await kafka.call(name, body, pipeline.timeout_ms() / 1000)
        if speaks_oip:
            model, version = request.headers.get(h.OIP_MODEL, name), request.headers.get(h.OIP_VERSION, "")
            result = oip.reencode(status, result, model, version, request_id)
        headers = {h.SERVED: served} if served else {}
        if status == 503:  # refused before anything was produced: another bridge may take it
            headers[h.RETRIABLE] = "true"
        return web.Response(body=result, status=status, content_type="application/json", headers=headers)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")  # Consul's check on this bridge

    app = web.Application(middlewares=[_gateway_only], client_max_size=MAX_BODY_CEILING)  # the gateway says less
    app.router.add_post("/bridge/{pipeline}", bridge)
    app.router.add_get("/healthz", healthz)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _gateway_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Under mTLS, only the gateway may call the bridge (the TLS layer has checked the chain already)."""
    if request.transport is None or request.transport.get_extra_info("sslcontext") is None:
        return await handler(request)  # plaintext deployment, loopback
    peer = request.transport.get_extra_info("peercert") or {}
    uris = [value for kind, value in peer.get("subjectAltName", ()) if kind == "URI"]
    if GATEWAY_IDENTITY not in {identity_of(uri) for uri in uris}:
        return web.json_response({"error": "only the gateway may call the Kafka bridge"}, status=403)
    return await handler(request)


class BridgeServer:
    """Serves the bridge on `address` and keeps it registered in Consul while it runs."""

    def __init__(
        self,
        app: web.Application,
        address: tuple[str, int],
        client: consul.aio.Consul,
        kv_prefix: str,
        tls: ssl.SSLContext | None = None,
    ):
        self.app = app
        self.tls = tls
        self.host, self.port = address
        if tls is None:
            check = consul.Check.http(
                f"http://{self.host}:{self.port}/healthz", interval="1s", timeout="1s", deregister="1m"
            )
        else:  # Consul's agent has no client certificate: it can only see that the port answers
            check = consul.Check.tcp(self.host, self.port, interval="1s", timeout="1s", deregister="1m")
        service_id = bridge_service_id(self.host, self.port)
        self.presence = Presence(
            client, BRIDGE_SERVICE, service_id, self.host, self.port, check, bridge_meta(kv_prefix)
        )
        self._runner: web.AppRunner | None = None

    async def start(self) -> BridgeServer:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, ssl_context=self.tls).start()
        log.info("kafka bridge at http://%s:%d/bridge/", self.host, self.port)
        await self.presence.start()
        return self

    async def deregister(self) -> None:
        """Gateways stop sending here; in-flight calls still finish until stop()."""
        await self.presence.stop()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
