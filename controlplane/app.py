"""The control plane process: xDS (and, with later pieces, admin and discovery)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from controlplane.config import DEFAULT_XDS_ADDR
from controlplane.xds.cache import GroupBy, SnapshotCache
from controlplane.xds.server import AdsServicer
from controlplane.xds.status import StatusBook

log = logging.getLogger("mllambda")


class XdsServer:
    """A grpc.aio server streaming what `cache` holds."""

    def __init__(self, cache: SnapshotCache, status: StatusBook, address: str) -> None:
        self.cache = cache
        self.status = status
        self.address = address
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> XdsServer:
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_concurrent_streams", 100_000),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.so_reuseport", 0),
            ]
        )
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
            AdsServicer(self.cache, self.status), self._server
        )
        self.port = self._server.add_insecure_port(self.address)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.address} (port taken?)")
        await self._server.start()
        log.info("xds listening address=%s", self.address)
        return self

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)


async def serve(xds_addr: str, group_by: GroupBy) -> None:
    cache, status = SnapshotCache(group_by), StatusBook()
    server = await XdsServer(cache, status, xds_addr).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def cmd_controlplane(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(args.xds, args.group_by))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("controlplane", help="run the control plane (xDS server)")
    parser.add_argument("--xds", default=DEFAULT_XDS_ADDR, help="xDS (ADS) listen address")
    parser.add_argument(
        "--group-by", choices=["id", "cluster"], default="id", help="share snapshots by node ..."
    )
    parser.set_defaults(handler=cmd_controlplane)
