"""The xDS gRPC server: streams what the snapshot cache holds (see streams.py)."""

from __future__ import annotations

import logging

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from controlplane.listen import GRPC_OPTIONS, bind_grpc
from controlplane.xds.acks import AckBook
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.streams import AdsServicer

log = logging.getLogger("mllambda.xds")


class XdsServer:
    """A grpc.aio server streaming what `cache` holds, recording ACKs/NACKs in `acks`."""

    def __init__(self, cache: SnapshotCache, acks: AckBook, address: str) -> None:
        self.cache = cache
        self.acks = acks
        self.address = address
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> XdsServer:
        self._server = grpc.aio.server(options=GRPC_OPTIONS)
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(AdsServicer(self.cache, self.acks), self._server)
        self.port = bind_grpc(self._server, self.address, "xDS")
        await self._server.start()
        log.info("xds listening address=%s", self.address)
        return self

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
