"""The xDS gRPC server: streams what the snapshot cache holds (see streams.py)."""

from __future__ import annotations

import logging
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from controlplane.consul.certs import CertKeeper
from controlplane.listen import GRPC_OPTIONS, bind_grpc
from controlplane.xds.acks import AckBook
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.streams import AdsServicer, Authorize

log = logging.getLogger("mllambda.xds")


class XdsServer:
    """A grpc.aio server streaming what `cache` holds, recording ACKs/NACKs in `acks`."""

    def __init__(
        self,
        cache: SnapshotCache,
        acks: AckBook,
        address: str,
        keeper: CertKeeper | None = None,
        authorize: Authorize | None = None,
    ) -> None:
        """With `keeper` (our identity) and `authorize`: mTLS, and each Envoy gets only its own node's config."""
        self.cache = cache
        self.acks = acks
        self.address = address
        self.keeper = keeper
        self.authorize = authorize
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> XdsServer:
        self._server = grpc.aio.server(options=GRPC_OPTIONS)
        servicer = AdsServicer(self.cache, self.acks, self.authorize if self.keeper else None)
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, self._server)
        self.port = bind_grpc(self._server, self.address, "xDS", self._credentials())
        await self._server.start()
        log.info("xds listening address=%s", self.address)
        return self

    def _credentials(self) -> grpc.ServerCredentials | None:
        """mTLS with our current leaf; gRPC asks again at every handshake, so a rotated leaf is used at once."""
        keeper = self.keeper
        if keeper is None or keeper.identity is None:
            return None
        served: Any = keeper.identity

        def config(identity: Any) -> Any:
            pair = [(identity.key.encode(), identity.chain.encode())]
            return grpc.ssl_server_certificate_configuration(pair, root_certificates=identity.roots.encode())

        def fetch() -> Any:
            nonlocal served
            if keeper.identity is served:
                return None
            served = keeper.identity
            return config(served)

        return grpc.dynamic_ssl_server_credentials(config(served), fetch, require_client_authentication=True)

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
