"""Identities from Consul's Connect CA: one service's leaf certificate and the CA roots, kept fresh.

A private key travels only from the local Consul agent to the process that
uses it. A runtime (or the gateway's launcher) fetches its own leaf and writes
it where only its Envoy reads it: file-based SDS in a 0700 folder, replaced by
an atomic rename that Envoy's directory watch picks up. The control plane keeps
its own leaves in memory (xDS server, Kafka bridge). SDS from the control plane
would have been simpler to wire, but would make it hold every runtime's key.

Rotation: Consul answers blocking queries on the roots and on the leaf when
either changes (a CA rotation re-issues every leaf, spread over ~30 s, each
carrying the new root cross-signed by the old one). Roots are written first and
always as the whole set in force, so a peer's new leaf is trusted the moment
it is presented.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import consul.aio
from consul.callback import CB

from contract.naming import CA_FILE, CA_SECRET, CERT_FILE, CERT_SECRET
from contract.watch import WAIT, watch
from controlplane.errors import CliError
from controlplane.files import private_dir

log = logging.getLogger("mllambda.certs")
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


@dataclass(frozen=True)
class Identity:
    service: str
    chain: str  # the leaf and any intermediates, PEM
    key: str
    roots: str  # every CA root in force, PEM (two during a rotation)
    serial: str


IdentityListener = Callable[[Identity], None]  # called with each new identity (the first, then every renewal)


class CertKeeper:
    """Keeps `service`'s leaf and the roots fresh; tells every listener about each new identity."""

    def __init__(self, client: consul.aio.Consul, service: str, on_change: IdentityListener | None = None) -> None:
        self.client = client
        self.service = service
        self._listeners: list[IdentityListener] = [on_change] if on_change else []
        self.identity: Identity | None = None
        self._ready = asyncio.Event()
        self._leaf: dict[str, Any] | None = None
        self._roots: str | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, timeout: float = 30.0) -> Identity:
        """The first identity (waits for Consul up to `timeout`), then keep it fresh in the background."""
        self._tasks = [
            asyncio.create_task(watch(self._query_roots, self._take_roots, what="connect ca roots")),
            asyncio.create_task(watch(self._query_leaf, self._take_leaf, what=f"connect leaf {self.service}")),
        ]
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            await self.stop()
            raise CliError(
                f"no certificate for {self.service!r} from Consul's Connect CA in {timeout:.0f}s: "
                "is Connect enabled on the agent (`connect { enabled = true }`; on in -dev)?"
            ) from None
        assert self.identity is not None
        return self.identity

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _query_roots(self, index: int | None) -> tuple[Any, Any]:
        return await self._get("/v1/agent/connect/ca/roots", index)

    async def _query_leaf(self, index: int | None) -> tuple[Any, Any]:
        return await self._get(f"/v1/agent/connect/ca/leaf/{self.service}", index)

    async def _get(self, path: str, index: int | None) -> tuple[Any, Any]:
        params = [("index", str(index)), ("wait", WAIT)] if index else []
        return await self.client.http.get(CB.json(index=True), path, params=params)

    def _take_roots(self, answer: dict[str, Any]) -> None:
        pems = [root["RootCert"].strip() for root in answer["Roots"]]
        if not pems:
            raise ValueError("Consul answered no CA roots")
        self._roots = "\n".join(pems) + "\n"
        self._publish()

    def _take_leaf(self, answer: dict[str, Any]) -> None:
        if not answer.get("CertPEM") or not answer.get("PrivateKeyPEM"):
            raise ValueError("Consul answered a leaf without certificate or key")
        self._leaf = answer
        self._publish()

    def _publish(self) -> None:
        if self._leaf is None or self._roots is None:
            return
        fresh = Identity(
            self.service, self._leaf["CertPEM"], self._leaf["PrivateKeyPEM"], self._roots, self._leaf["SerialNumber"]
        )
        if fresh == self.identity:
            return
        if self.identity is not None:
            log.info("identity renewed service=%s serial=%s", self.service, fresh.serial)
        self.identity = fresh
        for listener in self._listeners:
            listener(fresh)
        self._ready.set()

    def subscribe(self, listener: IdentityListener) -> None:
        """One more listener: several TLS contexts can follow one identity, each reloaded on renewal."""
        self._listeners.append(listener)


def write_sds(folder: Path, identity: Identity) -> None:
    """Envoy's file-based SDS: the CA first, then the leaf, each replaced atomically."""
    private_dir(folder)
    ca = {"name": CA_SECRET, "validation_context": {"trusted_ca": {"inline_string": identity.roots}}}
    cert = {
        "name": CERT_SECRET,
        "tls_certificate": {
            "certificate_chain": {"inline_string": identity.chain},
            "private_key": {"inline_string": identity.key},
        },
    }
    for name, secret in ((CA_FILE, ca), (CERT_FILE, cert)):
        _replace(folder / name, json.dumps({"resources": [{"@type": SECRET_TYPE, **secret}]}))


def _replace(path: Path, text: str) -> None:
    """Write beside, then rename over: a reader (Envoy's watch) never sees half a file."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(temp, path)


def server_context(identity: Identity, folder: Path) -> ssl.SSLContext:
    """A TLS server context that requires a client certificate from our CA, and trusts no other (the bridge).

    Not `ssl.create_default_context`: that would also trust the system's public CAs for client certificates.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    load_identity(context, identity, folder)
    return context


def client_context(identity: Identity, folder: Path) -> ssl.SSLContext:
    """A TLS client context presenting `identity` and trusting only our CA. Peers are named by SPIFFE URI,
    not by host name, so the host name is not checked; the chain is."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    load_identity(context, identity, folder)
    return context


def renewed_context(keeper: CertKeeper, folder: Path, client: bool = False) -> ssl.SSLContext:
    """A server (or client) context for `keeper`'s identity, reloaded in place whenever Consul renews it."""
    assert keeper.identity is not None
    context = (client_context if client else server_context)(keeper.identity, folder)
    keeper.subscribe(lambda fresh: load_identity(context, fresh, folder))
    return context


def key_copies(kind: str) -> Path:
    """A private folder for the copy of a key that `ssl` must load from a file (removed on stop)."""
    return Path(tempfile.gettempdir()) / f"mllambda-{os.getuid()}" / f"{kind}-{os.getpid()}"


def load_identity(context: ssl.SSLContext, identity: Identity, folder: Path) -> None:
    """(Re)load a context's certificate and trusted roots; handshakes after this use them."""
    private_dir(folder)
    chain, key = folder / "chain.pem", folder / "key.pem"
    _replace(chain, identity.chain)
    _replace(key, identity.key)
    context.load_cert_chain(chain, key)
    context.load_verify_locations(cadata=identity.roots)
