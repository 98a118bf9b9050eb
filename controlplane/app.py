"""The control plane process: wires the store, admin API and xDS server together."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import time
from dataclasses import dataclass, field, replace

import consul.aio
import grpc
from aiohttp import web
from envoy.service.discovery.v3 import ads_pb2_grpc

from controlplane.config import DEFAULT_ADMIN_ADDR, DEFAULT_XDS_ADDR, ConsulAddress, resolve, split_host_port
from controlplane.errors import CliError
from controlplane.kafka import KafkaPlane
from controlplane.store import DEFAULT_PREFIX, PipelineVersion
from controlplane.traffic import TrafficScraper, VariantTraffic, per_variant
from controlplane.translate.pipelines import Options, translate
from controlplane.translate.resources import KAFKA_BROKER_FILTER
from controlplane.web import LatencyHistogram
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
        self._server = grpc.aio.server(options=GRPC_OPTIONS)
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
            AdsServicer(self.cache, self.status), self._server
        )
        self.port = bind(self._server, self.address, "xDS")
        await self._server.start()
        log.info("xds listening address=%s", self.address)
        return self

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)


GRPC_OPTIONS = [
    ("grpc.max_concurrent_streams", 100_000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.so_reuseport", 0),
]


def bind(server: grpc.aio.Server, address: str, what: str) -> int:
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as err:
        raise OSError(f"cannot listen for {what} on {address}: {err}") from err
    if port == 0:
        raise OSError(f"cannot listen for {what} on {address}: address in use?")
    return int(port)


@dataclass(frozen=True)
class Settings:
    xds_addr: str = DEFAULT_XDS_ADDR
    admin_addr: str = DEFAULT_ADMIN_ADDR
    consul: ConsulAddress = field(default_factory=ConsulAddress.from_settings)
    token: str | None = None
    group_by: GroupBy = "id"
    kv_prefix: str = DEFAULT_PREFIX
    gateway_port: int = 18080
    gateway_admin_port: int = 0  # where to read the gateway Envoy's stats (0: not read)
    metrics_addr: str | None = None  # host:port for /metrics, /api/status, the dashboard and the Kafka bridge
    kafka_bootstrap: str | None = None  # enables transport: kafka


class ControlPlane:
    """Stateless: pipelines live in Consul KV, endpoints in Consul's catalog.

    Two watches (pipelines, runtimes) mark the state dirty; one loop translates
    and sets snapshots. Unchanged groups get an identical snapshot version, so
    only the Envoys whose config changed hear about it.
    """

    def __init__(self, settings: Settings) -> None:
        from controlplane.admin.server import PipelineAdmin
        from controlplane.discovery import Discovery
        from controlplane.store import PipelineStore

        self.settings = settings
        self.cache = SnapshotCache(settings.group_by)
        self.status = StatusBook()
        c = settings.consul
        self.consul = consul.aio.Consul(host=c.host, port=c.port, scheme=c.scheme, token=c.token)
        self.store = PipelineStore(self.consul, settings.kv_prefix)
        self.discovery = Discovery(self.consul, self._mark_dirty)
        self.admin = PipelineAdmin(self.store, self.status, self._known_models, self._carried_version)
        self.xds = XdsServer(self.cache, self.status, settings.xds_addr)
        self.kafka: KafkaPlane | None = None
        self.bridge: tuple[str, int] | None = None  # this process's Kafka bridge
        if settings.kafka_bootstrap:
            self.kafka = KafkaPlane(settings.kafka_bootstrap, self.consul, settings.kv_prefix)
            if settings.metrics_addr:
                self.bridge = split_host_port(settings.metrics_addr, 18002)
        self.admin.kafka_enabled = self.kafka is not None
        broker = split_host_port(settings.kafka_bootstrap.split(",")[0], 9092) if settings.kafka_bootstrap else None
        self.options = Options(gateway_port=settings.gateway_port, kafka_broker=broker)
        self.status.on_join.append(lambda node_id: self._mark_dirty())  # its Envoy's extensions may matter
        self.pipelines: list[PipelineVersion] = []
        self.history: dict[str, list[PipelineVersion]] = {}  # from the same watch, for the dashboard
        # group -> snapshot version -> {pipeline name: pipeline version} it carries (the last few)
        self.deployed: dict[str, dict[str, dict[str, int]]] = {}
        self.snapshots_set: dict[str, int] = {}
        self.push_latency = LatencyHistogram()
        self._set_at: dict[tuple[str, str], float] = {}
        self.status.on_ack(self._observe_push)
        self.traffic = TrafficScraper()
        self._web: web.AppRunner | None = None
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._admin_server: grpc.aio.Server | None = None

    def _mark_dirty(self) -> None:
        self._dirty.set()

    def _known_models(self) -> set[tuple[str, str]] | None:
        return self.discovery.known_models() if self.discovery.reachable else None

    async def start(self) -> ControlPlane:
        from controlplane.admin.server import BearerAuth, add_admin_services, mark_serving

        interceptors = [BearerAuth(self.settings.token)] if self.settings.token else []
        self._admin_server = grpc.aio.server(interceptors=interceptors)
        health = add_admin_services(self._admin_server, self.admin)
        bind(self._admin_server, self.settings.admin_addr, "the admin API")
        await self.xds.start()
        await self._admin_server.start()
        await mark_serving(health, True)
        log.info("admin listening address=%s", self.settings.admin_addr)
        if self.settings.metrics_addr:
            from controlplane.web import build_web_app

            host, port = split_host_port(self.settings.metrics_addr, 18002)
            self._web = web.AppRunner(build_web_app(self), access_log=None)
            await self._web.setup()
            await web.TCPSite(self._web, host, port).start()
            log.info("dashboard and metrics at http://%s:%d/", host, port)
        if self.kafka is not None:
            await self.kafka.start()
        self._mark_dirty()  # every known node group gets a snapshot, even with nothing deployed
        self._tasks = [
            asyncio.create_task(self.discovery.run()),
            asyncio.create_task(self._watch_pipelines()),
            asyncio.create_task(self._reconcile_forever()),
        ]
        if self.bridge is not None:
            self._tasks += [
                asyncio.create_task(self._keep_bridge_registered()),
                asyncio.create_task(self.discovery.watch_bridges(self.settings.kv_prefix)),
            ]
        return self

    @property
    def _bridge_id(self) -> str:
        assert self.bridge is not None
        return f"mllambda-bridge-{self.bridge[0]}-{self.bridge[1]}"

    async def _keep_bridge_registered(self) -> None:
        """In Consul, so that every control plane routes Kafka pipelines to every bridge."""
        from controlplane.kafka import register_bridge
        from runtime_sdk.registration import keep_registered

        assert self.bridge is not None
        again = functools.partial(register_bridge, self.consul, self._bridge_id, *self.bridge, self.settings.kv_prefix)
        try:
            await again()
        except Exception as err:  # Consul away: the keeper below registers it when it is back
            log.warning("registering the Kafka bridge failed: %s", err)
        await keep_registered(self.consul, self._bridge_id, again)

    async def _watch_pipelines(self) -> None:
        from controlplane.discovery import Backoff, next_index

        index, backoff = 0, Backoff()
        while True:
            try:
                view = await self.store.view(index or None)
            except Exception as err:  # keep serving the last known pipelines
                log.warning("pipeline watch failed: %s", err)
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            index = next_index(index, view.index)
            self.history = view.history
            live = view.live()
            if live != self.pipelines:
                if self.kafka is not None:
                    await self._sync_kafka(live)
                self.pipelines = live
                self._mark_dirty()

    async def _sync_kafka(self, live: list[PipelineVersion]) -> None:
        assert self.kafka is not None
        try:
            await self.kafka.sync([(v.pipeline, v.version) for v in live])
        except Exception:
            log.exception("publishing Kafka routing tables failed; will retry on the next change")

    async def _reconcile_forever(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                self.reconcile()
            except Exception:
                log.exception("reconcile failed; Envoys keep their last config")
            await asyncio.sleep(0.01)  # coalesce bursts of changes

    def reconcile(self) -> None:
        pipelines = [v.pipeline for v in self.pipelines]
        versions = {v.pipeline.name: v.version for v in self.pipelines}
        with_filter = frozenset(n for n, ext in self.status.extensions.items() if KAFKA_BROKER_FILTER in ext)
        options = replace(self.options, kafka_filter_nodes=with_filter, bridges=self.kafka_bridges())
        snapshots = translate(pipelines, self.discovery.instances(), options)
        for group, snapshot in snapshots.items():
            self._remember(group, snapshot.version, versions)
            previous = self.cache.get(group)
            if previous is not None and previous.version == snapshot.version:
                continue
            self.cache.set_snapshot(group, snapshot)
            self._set_at[(group, snapshot.version)] = time.monotonic()
            while len(self._set_at) > 10_000:
                del self._set_at[next(iter(self._set_at))]
            self.snapshots_set[group] = self.snapshots_set.get(group, 0) + 1
            log.info("snapshot group=%s version=%s pipelines=%s", group, snapshot.version, versions)

    def kafka_bridges(self) -> tuple[tuple[str, int], ...]:
        """Where gateways send Kafka pipelines' HTTP requests: every passing bridge of this deployment, and ours."""
        return tuple(sorted({*self.discovery.bridges, *([self.bridge] if self.bridge else [])}))

    async def traffic_rows(self) -> list[VariantTraffic]:
        """Observed traffic per pipeline/stage/variant, from every Envoy's own stats."""
        ports = [i.envoy_admin_port for i in self.discovery.instances() if i.envoy_admin_port]
        if self.settings.gateway_admin_port:
            ports.append(self.settings.gateway_admin_port)
        stats = await self.traffic.stats(ports)
        return per_variant([v.pipeline for v in self.pipelines], stats)

    def envoy_admin_urls(self) -> dict[str, str]:
        urls = {i.service_id: f"http://127.0.0.1:{i.envoy_admin_port}/" for i in self.discovery.instances()}
        if self.settings.gateway_admin_port:
            urls["gateway"] = f"http://127.0.0.1:{self.settings.gateway_admin_port}/"
        return urls

    def _observe_push(self, node_id: str, group: str, type_url: str, version: str) -> None:
        set_at = self._set_at.get((group, version))
        elapsed = time.monotonic() - set_at if set_at is not None else None
        if elapsed is not None and elapsed < 60:  # not a re-ACK after a reconnect
            self.push_latency.observe(elapsed)

    def _remember(self, group: str, snapshot_version: str, versions: dict[str, int], keep: int = 8) -> None:
        """Same config, newer pipeline versions: the node serves them already. Bounded per group."""
        history = self.deployed.setdefault(group, {})
        history.pop(snapshot_version, None)
        history[snapshot_version] = versions
        while len(history) > keep:
            del history[next(iter(history))]

    def _carried_version(self, group: str, snapshot_version: str, name: str) -> int:
        return self.deployed.get(group, {}).get(snapshot_version, {}).get(name, 0)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.bridge is not None:  # gateways stop sending here; in-flight calls finish below
            try:
                await self.consul.agent.service.deregister(self._bridge_id)
            except Exception as err:
                log.warning("deregistering the Kafka bridge failed: %s", err)
        if self._web is not None:
            await self._web.cleanup()
        if self.kafka is not None:
            await self.kafka.stop()
        if self._admin_server is not None:
            await self._admin_server.stop(0.5)
        await self.xds.stop(0.5)
        await self.consul.close()


async def serve(settings: Settings) -> None:
    plane = await ControlPlane(settings).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await plane.stop()


def cmd_controlplane(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = Settings(
            xds_addr=args.xds,
            admin_addr=resolve(args.admin, "MLLAMBDA_ADMIN_ADDR", DEFAULT_ADMIN_ADDR),
            consul=ConsulAddress.from_settings(args.consul),
            token=os.environ.get("MLLAMBDA_TOKEN") or None,
            group_by=args.group_by,
            kv_prefix=resolve(args.kv_prefix, "MLLAMBDA_KV_PREFIX", DEFAULT_PREFIX),
            gateway_port=args.gateway_port,
            gateway_admin_port=args.gateway_admin_port,
            metrics_addr=f"127.0.0.1:{args.metrics_port}" if args.metrics_port else None,
            kafka_bootstrap=resolve(args.kafka_bootstrap, "MLLAMBDA_KAFKA_BOOTSTRAP", "") or None,
        )
        asyncio.run(serve(settings))
    except (OSError, ValueError) as err:
        raise CliError(str(err)) from err
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("controlplane", help="run the control plane (xDS + admin API)")
    parser.add_argument("--xds", default=DEFAULT_XDS_ADDR, help="xDS (ADS) listen address")
    parser.add_argument("--admin", help=f"admin API listen address (default {DEFAULT_ADMIN_ADDR})")
    parser.add_argument("--consul", help="Consul HTTP address (default: CONSUL_HTTP_ADDR or 127.0.0.1:8500)")
    parser.add_argument(
        "--group-by", choices=["id", "cluster"], default="id", help="share snapshots by node id or cluster"
    )
    parser.add_argument("--kv-prefix", help=f"Consul KV prefix for pipelines (default {DEFAULT_PREFIX})")
    parser.add_argument("--gateway-port", type=int, default=18080, help="port of the gateway Envoy's listener")
    parser.add_argument("--gateway-admin-port", type=int, default=0, help="gateway Envoy admin port (for its stats)")
    parser.add_argument("--kafka-bootstrap", help="Kafka broker for transport: kafka (MLLAMBDA_KAFKA_BOOTSTRAP)")
    parser.add_argument("--metrics-port", type=int, help="serve /metrics, /api/status and the dashboard here")
    parser.set_defaults(handler=cmd_controlplane)
