"""Packages for hosts that lack them: the control plane serves the store's archives, each only to its own model.

`GET /v1/packages/<model>/<version>` answers the archive of that version. Under mTLS
the caller must present a certificate of our Connect CA whose identity is that model
(a runtime of `classifier` may fetch `classifier` packages, nothing else); without
mTLS the server listens on loopback only. The caller checks the archive against the
digest in the version's record in Consul, which it reads itself: a server that sends
other bytes cannot make a host run them.
"""

from __future__ import annotations

import json
import logging
import ssl
from typing import Any

import aiohttp
from aiohttp import web

from contract.naming import identity_of
from controlplane.models.store import BadPackage, ModelNotFound, ModelStore, ModelStoreUnavailable, read_blob

log = logging.getLogger("mllambda.packages")
PATH = "/v1/packages/{model}/{version}"
FETCH_TIMEOUT = 600.0


def may_fetch(peer_uris: list[str] | None, model: str) -> bool:
    """None: a plaintext listener (loopback only). Else the caller's SPIFFE identity must be the model's."""
    return peer_uris is None or model in {identity_of(uri) for uri in peer_uris}


def _peer_uris(request: web.Request) -> list[str] | None:
    if request.transport is None or request.transport.get_extra_info("sslcontext") is None:
        return None
    peer = request.transport.get_extra_info("peercert") or {}
    return [value for kind, value in peer.get("subjectAltName", ()) if kind == "URI"]


def build_package_app(store: ModelStore) -> web.Application:
    async def package(request: web.Request) -> web.Response:
        model, version = request.match_info["model"], request.match_info["version"]
        if not may_fetch(_peer_uris(request), model):
            log.warning("package refused model=%s version=%s: the caller is not a runtime of it", model, version)
            return web.json_response({"error": f"only runtimes of {model[:80]!r} may fetch its packages"}, status=403)
        try:
            record = await store.get(model, version)
            archive = read_blob(store.dir, record.digest)
        except BadPackage as err:
            return web.json_response({"error": str(err)}, status=400 if "digest" not in str(err) else 500)
        except ModelNotFound as err:
            return web.json_response({"error": str(err)}, status=404)
        except ModelStoreUnavailable as err:
            return web.json_response({"error": str(err)}, status=503)
        log.info("package served model=%s version=%s digest=%s", model, version, record.digest[:12])
        return web.Response(body=archive, content_type="application/x-tar", headers={"x-mll-digest": record.digest})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get(PATH, package)
    app.router.add_get("/healthz", healthz)
    return app


class PackageServer:
    def __init__(self, app: web.Application, address: tuple[str, int], tls: ssl.SSLContext | None = None) -> None:
        self.app, self.tls = app, tls
        self.host, self.port = address
        self._runner: web.AppRunner | None = None

    async def start(self) -> PackageServer:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, ssl_context=self.tls).start()
        log.info("packages at %s://%s:%d/v1/packages/", "https" if self.tls else "http", self.host, self.port)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def fetch(address: str, model: str, version: str, tls: ssl.SSLContext | None) -> bytes:
    """The archive of model:version from a control plane at `address` (HOST:PORT). The caller checks its digest."""
    url = f"{'https' if tls else 'http'}://{address}/v1/packages/{model}/{version}"
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url, ssl=tls or False) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise ModelNotFound(f"{url}: {resp.status} {_error(body)}")
            return body
    except (aiohttp.ClientError, OSError, TimeoutError) as err:
        raise ModelStoreUnavailable(f"cannot fetch the package from {url}: {err}") from err


def _error(body: bytes) -> Any:
    try:
        return json.loads(body).get("error", "")
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")
