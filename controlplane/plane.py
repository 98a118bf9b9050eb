"""The control plane process: wires store, discovery, switch, reconcile, xDS, admin API, Kafka and the dashboard.

Pipelines live in Consul KV, endpoints in Consul's catalog. Two watches
(pipelines, runtimes) mark the state dirty; one loop moves versions through the
staged change protocol (switch.py) as Envoys acknowledge, and reconciles.
Unchanged groups get an identical snapshot version, so only the Envoys whose
config changed hear about it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import shutil
import signal
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from contract.naming import BRIDGE_SERVICE, CONTROL_PLANE_IDENTITY, FRONT_SERVICE, GATEWAY_IDENTITY, bridge_reply_topic
from contract.watch import watch
from controlplane.config import STACK_STATE, split_host_port
from controlplane.consul import client as consul_client
from controlplane.consul.certs import CertKeeper, key_copies, renewed_context
from controlplane.consul.discovery import Discovery
from controlplane.delivery.peer_acks import SharedAcks
from controlplane.delivery.reconcile import Reconciler
from controlplane.delivery.replays import ReplayBook, ReplayView, Trial
from controlplane.delivery.rollout_driver import RolloutDriver
from controlplane.delivery.switch import Switchboard
from controlplane.delivery.traffic import TrafficBook, VariantTraffic, per_variant, stats_urls
from controlplane.errors import CliError
from controlplane.kafka.bridge import BridgeServer, build_bridge_app
from controlplane.kafka.plane import KafkaPlane
from controlplane.listen import admin_credentials, bind_grpc, loopback_if_any, metrics_address, refuse_exposed
from controlplane.models.server import PackageServer, build_package_app
from controlplane.models.signatures import SignatureBook
from controlplane.models.store import ModelStore, ModelStoreUnavailable, Trouble
from controlplane.monitoring.callers import CallerBook
from controlplane.monitoring.monitor import Monitor
from controlplane.pipeline.model import Pipeline, PipelineVersion
from controlplane.pipeline.store import EmptyHold, PipelineStore, StoreView
from controlplane.scaling.scaler import autoscaler_from
from controlplane.settings import Settings, add_arguments, settings_from
from controlplane.stack.kubernetes import deployed_runtime
from controlplane.translate.pipelines import Deployment, Options, gateway_clusters
from controlplane.view import PlaneView, envoy_admin_urls, stack_processes
from controlplane.web.dashboard import DashboardServer, build_dashboard_app
from controlplane.web.manage import LocalAdmin
from controlplane.xds.acks import AckBook
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.server import XdsServer
from controlplane.xds.streams import WAIT

if TYPE_CHECKING:
    from controlplane.edge.front import OipFront

log = logging.getLogger("mllambda")
TICK = 0.2  # seconds between checks while a version waits or drains
GC_YOUNG = 50_000  # allocations between young-generation collections (Python's default: 700)
STOP_TASKS_TIMEOUT = 5.0  # seconds the background tasks have to finish once cancelled (a lock given back)
COALESCE = 0.03  # seconds after a reconcile before the next: a burst of changes is translated once


class ControlPlane:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        c = settings.consul
        self.consul = consul_client.connect(c)
        self.cache = SnapshotCache(settings.group_by)
        self.acks = AckBook()
        self.store = PipelineStore(self.consul, settings.kv_prefix, settings.keep_versions)
        self.kafka: KafkaPlane | None = None
        self.bridge: BridgeServer | None = None
        self.front: OipFront | None = None  # with --oip-grpc
        broker = None
        if settings.kafka_bootstrap:
            reply_topic = bridge_reply_topic(*split_host_port(settings.bridge_addr, 18003))
            self.kafka = KafkaPlane(settings.kafka_bootstrap, self.consul, settings.kv_prefix, reply_topic)
            broker = split_host_port(settings.kafka_bootstrap.split(",")[0], 9092)
        mtls = settings.security == "mtls"
        if mtls and not settings.gateway_tls_dir:
            raise ValueError("--security mtls needs --gateway-tls-dir (the gateway Envoy's certificate folder)")
        options = Options(
            gateway_host=settings.gateway_host,
            gateway_port=settings.gateway_port,
            kafka_broker=broker,
            mtls=mtls,
            gateway_tls_dir=settings.gateway_tls_dir,
            # Envoys sharing a snapshot may be on different hosts: each goes through the ingress.
            colocated="ingress" if settings.group_by == "cluster" else settings.colocated,
            run_folder=settings.run_folder,
        )
        self.options = options
        self.identity = CertKeeper(self.consul, CONTROL_PLANE_IDENTITY) if mtls else None
        self.bridge_identity = CertKeeper(self.consul, BRIDGE_SERVICE) if mtls and self.kafka else None
        self.packages_identity = self.identity if settings.packages_addr else None  # one identity, two contexts
        self.packages: PackageServer | None = None
        # Discovery's blocking queries get their own connections: admin calls never wait behind them.
        self.watch_consul = consul_client.connect(c)
        self.discovery = Discovery(
            self.watch_consul,
            self._mark_dirty,
            reserved_ids=frozenset({options.gateway_group}),
            empty_grace=settings.empty_grace,
            require_tls=mtls,
        )
        self.reconciler = Reconciler(self.cache, self.acks, options)
        # The other control planes' sidecars count too: each one's ACKs, through a record in Consul.
        self.peers = SharedAcks(
            self.watch_consul, settings.kv_prefix, self.reconciler.local_view, lambda: self._wake.set()
        )
        self.switchboard = Switchboard()
        self.replay_book = ReplayBook(self.consul, settings.kv_prefix)
        self.replays = ReplayView(0)  # the trials and reports in Consul (watched)
        self._trials: frozenset[tuple[str, str]] = frozenset()  # (pipeline, replay id) pushed by the last reconcile
        # The admin API needs the generated stubs; importing it here (not at module level) keeps
        # `mllambda setup`, which generates them, runnable on a fresh checkout.
        from controlplane.admin.server import PipelineAdmin

        self.admin = PipelineAdmin(
            self.store, self.acks, self._known_models, self.reconciler.carried_version, self.switchboard.notes
        )
        self.admin.kafka_enabled = self.kafka is not None
        from controlplane.admin.models import ModelAdmin

        self.model_store = ModelStore(self.consul, Path(settings.model_store), settings.kv_prefix)
        self.models = ModelAdmin(self.model_store, self._models_in_traffic)
        self.monitor = Monitor(self.consul, settings.kv_prefix, self.discovery.instances, relations=self._compared)
        self.models.monitor = self.monitor
        self.callers = CallerBook(self.discovery.instances)
        self.signatures = SignatureBook(self.model_store)
        self.admin.contracts = self.signatures.contracts
        self.admin.replays = self.replay_book
        self.admin.trial_missing = self._trial_missing
        self.xds = XdsServer(self.cache, self.acks, settings.xds_addr, self.identity, self._authorize)
        self.acks.listen(self)
        self.pipelines: list[PipelineVersion] = []
        self.history: dict[str, list[PipelineVersion]] = {}  # from the same watch, for the dashboard
        self.broken: dict[str, str] = {}  # pipeline -> why its record in the store was skipped
        self.traffic_book = TrafficBook(
            lambda: stats_urls(self.discovery.instances(), settings.gateway_admin_port, self.identity is not None)
        )
        holder = f"{socket.gethostname()} admin={settings.admin_addr} pid={os.getpid()}"
        self.rollouts = RolloutDriver(
            self.consul,
            self.store,
            settings.kv_prefix,
            self._in_traffic,
            self.traffic_book.stats,
            holder,
            self._refused,
            lambda name: self.replays.reports.get(name, ()),
            lambda candidate, baseline, field: self.monitor.agreement_of(candidate, baseline, field),
            lambda candidate, baseline: self.monitor.output_drift(candidate, baseline),
        )
        self.autoscaler = autoscaler_from(
            settings, self.consul, self.discovery.instances, self.traffic_book, holder, deployed_runtime
        )
        self._dashboard: DashboardServer | None = None
        self._ui: LocalAdmin | None = None
        self._wake = asyncio.Event()
        self._dirty = True
        self._read_once = False
        self.empty_hold = EmptyHold(settings.empty_grace)  # the store's prefix read empty after it held pipelines
        self._hold_timer: asyncio.TimerHandle | None = None
        self._newest_view = StoreView(0, {}, {})
        self._tasks: list[asyncio.Task[None]] = []
        self._admin_server: grpc.aio.Server | None = None

    def joined(self, node_id: str) -> None:
        self._mark_dirty()  # its Envoy's extensions may matter to its snapshot

    def acked(self, node_id: str, group: str, type_url: str, version: str) -> None:
        self._wake.set()  # a pending version may be ready now
        self.peers.changed()  # and this control plane's record, which the others read, may change

    def _mark_dirty(self) -> None:
        self._dirty = True
        self._wake.set()

    def _authorize(self, identity: str, node_id: str, group: str) -> str | None:
        """Is the holder of `identity`'s certificate this node? The gateway's, or a registered runtime's model."""
        gateway = self.options.gateway_group
        if gateway in (node_id, group) or identity == GATEWAY_IDENTITY:
            ok = identity == GATEWAY_IDENTITY and gateway in (node_id, group)
            return None if ok else f"a certificate for {identity!r} cannot ask as node {node_id[:80]!r}"
        instance = self.discovery.instance(node_id)
        if instance is None:
            return WAIT  # not registered yet: nothing is sent until it is
        if instance.model != identity:
            return f"a certificate for {identity!r} cannot ask as node {node_id!r} (a runtime of {instance.model!r})"
        return None

    def _in_traffic(self) -> list[PipelineVersion]:
        return self.switchboard.in_traffic(self.acks.is_connected(self.options.gateway_group))

    async def _models_in_traffic(self) -> dict[str, set[tuple[str, str]]]:
        return {v.pipeline.name: v.pipeline.models() for v in self._in_traffic()}

    def _refused(self) -> list[tuple[PipelineVersion, PipelineVersion, str]]:
        """(pending, entry, why) for each new version an Envoy rejected while the last one still serves."""
        found = []
        for pending, entry in self.switchboard.stuck(after=3.0):
            rejected = self.reconciler.rejected((pending.pipeline.name, pending.version))
            found += [(pending, entry, rejected[0])] if rejected else []
        return found

    def _known_models(self) -> set[tuple[str, str]] | None:
        idle = {(p.model, p.version) for p in self.autoscaler.activator.policies}
        return self.discovery.known_models() | idle if self.discovery.reachable else None

    async def start(self) -> ControlPlane:
        from controlplane.admin.server import BearerAuth, add_admin_services, mark_serving

        settings = self.settings
        admin_tls = admin_credentials(*settings.admin_tls)
        host = split_host_port(settings.admin_addr, 18001)[0]
        guarded = bool(admin_tls and settings.token) or settings.exposed
        refuse_exposed("the admin API", host, guarded, "--insecure-expose")
        host = split_host_port(settings.xds_addr, 18000)[0]
        refuse_exposed("xDS", host, self.identity is not None or settings.exposed, "--insecure-expose")
        dashboard_at = metrics_address(settings.metrics_addr, settings.exposed) if settings.metrics_addr else None
        interceptors = [BearerAuth(settings.token)] if settings.token else []
        # no SO_REUSEPORT (gRPC's default): a second control plane on the same port fails to start instead of
        # sharing the port's connections with the first (found by a CI run: an admin call reset mid-connect)
        self._admin_server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        health = add_admin_services(self._admin_server, self.admin, self.models)
        bind_grpc(self._admin_server, settings.admin_addr, "the admin API", admin_tls)
        if dashboard_at is not None:
            self._ui = LocalAdmin(self._admin_server, settings.token, settings.ui_token)
        for keeper in (self.identity, self.bridge_identity):
            if keeper is not None:
                await keeper.start()
        if self.identity is not None:  # reads counters of Envoys on other hosts through their ingress
            self.traffic_book.scraper.tls = renewed_context(self.identity, key_copies("stats"), client=True)
            self.monitor.tls = self.traffic_book.scraper.tls  # and runtimes' profiles, through the same ingress
            self.callers.tls = self.traffic_book.scraper.tls  # and their admission per caller
        await self.xds.start()
        await self._admin_server.start()
        await mark_serving(health, True)
        log.info("admin listening address=%s", self.settings.admin_addr)
        if dashboard_at is not None:
            app = build_dashboard_app(self, self._ui, dashboard_at[0])
            self._dashboard = await DashboardServer(app, dashboard_at, self.consul, settings.gateway_admin_port).start()
        if self.kafka is not None:
            address = split_host_port(self.settings.bridge_addr, 18003)
            app = build_bridge_app(self.kafka, self._live_pipeline)
            tls = None
            if self.bridge_identity is not None:  # its key is copied where only we read it (ssl loads files)
                tls = renewed_context(self.bridge_identity, key_copies("bridge"))
            self.bridge = await BridgeServer(app, address, self.consul, self.settings.kv_prefix, tls).start()
        if settings.oip_grpc_addr:
            address = split_host_port(settings.oip_grpc_addr, 18005)
            refuse_exposed("the OIP gRPC front", address[0], settings.exposed, "--insecure-expose")
            gateway = f"http://{loopback_if_any(settings.gateway_host)}:{settings.gateway_port}"
            from controlplane.edge.front import OipFront  # its stubs are generated by `mllambda setup`

            self.front = await OipFront(address, gateway, self.consul, settings.kv_prefix).start()
        if settings.packages_addr:
            address = split_host_port(settings.packages_addr, 18004)
            refuse_exposed(
                "model packages",
                address[0],
                self.packages_identity is not None or settings.exposed,
                "--insecure-expose",
            )
            keeper = self.packages_identity
            tls = renewed_context(keeper, key_copies("packages")) if keeper is not None else None
            self.packages = await PackageServer(build_package_app(self.model_store), address, tls).start()
        self._mark_dirty()  # every known node group gets a snapshot once Consul has been read
        self._tasks = [
            asyncio.create_task(self.discovery.run()),
            asyncio.create_task(watch(self._query_store, self._take_pipelines, what="pipelines")),
            asyncio.create_task(watch(self._query_replays, self._take_replays, what="replays")),
            asyncio.create_task(self._reconcile_forever()),
            asyncio.create_task(self.peers.run()),
            asyncio.create_task(self.rollouts.run()),
            asyncio.create_task(self.traffic_book.run(lambda: bool(self.pipelines))),
            asyncio.create_task(self.monitor.run()),
            asyncio.create_task(self.callers.run()),
            asyncio.create_task(self.autoscaler.run()),
        ]
        if self.kafka is not None:
            self._tasks.append(asyncio.create_task(self.kafka.run(self._pending_kafka, self._wake.set)))
        if self.bridge is not None:
            self._tasks.append(asyncio.create_task(self.discovery.watch_edges(BRIDGE_SERVICE, self.settings.kv_prefix)))
        if self.front is not None:
            self._tasks.append(asyncio.create_task(self.discovery.watch_edges(FRONT_SERVICE, self.settings.kv_prefix)))
        return self

    def _compared(self) -> list[tuple[str, frozenset[str], bool]]:
        """Whose answers pair with whose in the stages in traffic (Stage.compared)."""
        return sorted(
            {c for v in self.pipelines for stage in v.pipeline.stages for c in stage.compared()},
            key=lambda c: (c[0], sorted(c[1]), c[2]),
        )

    def _live_pipeline(self, name: str) -> Pipeline | None:
        return next((v.pipeline for v in self.pipelines if v.pipeline.name == name), None)

    async def _query_store(self, index: int | None) -> tuple[int, StoreView]:
        view = await self.store.view(index)
        return view.index, view

    async def _take_pipelines(self, view: StoreView) -> None:
        self._newest_view = view
        if self.empty_hold.held(view, bool(self.history), time.time()):
            if self._hold_timer is None:
                log.warning(
                    "every pipeline vanished from Consul KV at once: serving them on for %.0f s unless they come back",
                    self.empty_hold.grace,
                )
                self._hold_timer = asyncio.get_running_loop().call_later(
                    self.empty_hold.grace + 0.1, self._end_empty_hold
                )
            return
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self.history = view.history
        for name, reason in view.broken.items():
            if self.broken.get(name) != reason:
                log.warning("pipeline=%s record skipped: %s", name, reason)
        self.broken = view.broken
        # A pipeline whose record broke keeps serving the version it had; the others go on.
        kept = [v for v in self.pipelines if v.pipeline.name in view.broken and v.pipeline.name not in view.current]
        live = sorted(view.live() + kept, key=lambda v: v.pipeline.name)
        if live != self.pipelines or not self._read_once:
            if self.kafka is not None:
                self.kafka.want([(v.pipeline, v.version) for v in live])
            self.pipelines = live
            # What the store says on a control plane's first read is what the Envoys serve already.
            self.switchboard.update(live, in_traffic=not self._read_once)
            self._read_once = True
            self._mark_dirty()

    def _end_empty_hold(self) -> None:
        """The grace is over: the newest view is taken, empty or not."""
        self._hold_timer = None
        self._tasks.append(asyncio.create_task(self._take_pipelines(self._newest_view)))

    async def _query_replays(self, index: int | None) -> tuple[int, ReplayView]:
        view = await self.replay_book.view(index)
        return view.index, view

    def _take_replays(self, view: ReplayView) -> None:
        for key, reason in view.skipped.items():
            if key not in self.replays.skipped:
                log.warning("replay record %s skipped: %s", key, reason)
        self.replays = view
        self._mark_dirty()

    def live_trials(self) -> dict[str, Trial]:
        """The running replays whose pipeline is live here (a trial of an unknown or deleted pipeline waits)."""
        now, names = time.time(), {v.pipeline.name for v in self.pipelines}
        return {name: t for name, t in self.replays.trials.items() if t.live(now) and name in names}

    def _deployments(self) -> list[Deployment]:
        trials = self.live_trials()
        return [
            replace(d, trials=((t.version, t.secret),)) if d.entry and (t := trials.get(d.entry.pipeline.name)) else d
            for d in self.switchboard.deployments()
        ]

    def _trial_missing(self, name: str, rid: str) -> list[str]:
        """What replay `rid` of pipeline `name` waits for before its requests may go in (nothing: ready)."""
        trial = self.live_trials().get(name)
        if trial is None or trial.id != rid:
            return [f"the control plane to read replay {rid} (pipeline {name!r} live, the replay not lapsed)"]
        pair = (name, trial.version.version)
        if (name, rid) not in self._trials:
            return ["its first translation"]
        missing = self.reconciler.missing_acks(pair, self.peers.reason)
        missing += self.reconciler.gateway_missing(gateway_clusters(trial.version))
        if not self.reconciler.gateway_routes(pair):
            missing.append(f"{self.options.gateway_group} (its route into the candidate)")
        return missing

    async def _reconcile_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=TICK)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._step()
            except Exception:
                log.exception("reconcile failed; Envoys keep their last config")
            await asyncio.sleep(COALESCE)

    def _pending_kafka(self) -> list[tuple[str, int]]:
        return [(v.pipeline.name, v.version) for v in self.switchboard.pending() if v.pipeline.transport == "kafka"]

    async def _step(self) -> None:
        if not (self._read_once and self.discovery.complete):
            return  # cold start: no Envoy gets a config before the first complete read (they keep theirs)
        # Readiness is judged on what the last reconcile routed, so a new version is first
        # translated (its hops pushed) and only then, on a later step, let in.
        if self.switchboard.advance(self._missing, self.reconciler.gateway_left):
            self._dirty = True
            self.traffic_book.entered.set()  # a reading of the counters where the new version's window starts
        ends = {
            (v.model, v.version)
            for p in self.pipelines
            for s in (p.pipeline.stages[0], p.pipeline.stages[-1])
            for v in s.all_variants()
        }
        if await self.signatures.follow(ends):
            self._dirty = True  # the gateway's OIP metadata names the models' inputs and outputs now
        trials = frozenset((name, t.id) for name, t in self.live_trials().items())
        if trials != self._trials:
            self._dirty = True  # one began, or lapsed
        if self._dirty:
            self._dirty = False
            self._trials = trials
            deployments = self._deployments()
            parked = self.autoscaler.activator.parked()
            self.reconciler.reconcile(
                deployments,
                self.discovery.instances(),
                self.kafka_bridges(),
                parked,
                self.signatures.table(),
                self.oip_fronts(),
            )
        self.peers.changed()  # streams may have come or gone since its last write

    def _missing(self, version: PipelineVersion) -> list[str]:
        """What a version waits for before it takes traffic (nothing: it is ready)."""
        name = version.pipeline.name
        gateway = self.reconciler.gateway_missing(gateway_clusters(version))
        if version.pipeline.transport != "kafka":
            return self.reconciler.missing_acks((name, version.version), self.peers.reason) + gateway
        if self.kafka is None:
            return ["a Kafka broker (--kafka-bootstrap)"]
        if not self.kafka_bridges():
            return ["a Kafka bridge"]
        if self.kafka.error:
            return [f"the Kafka broker ({self.kafka.error})"]
        return self.kafka.missing_consumers(name, version.version) + gateway

    def oip_fronts(self) -> tuple[tuple[str, int], ...]:
        """Where gateways send OIP gRPC calls: every passing front of this deployment, and ours."""
        ours = [(self.front.host, self.front.port)] if self.front else []
        return tuple(sorted({*self.discovery.edges.get(FRONT_SERVICE, ()), *ours}))

    def kafka_bridges(self) -> tuple[tuple[str, int], ...]:
        """Where gateways send Kafka pipelines' HTTP requests: every passing bridge of this deployment, and ours."""
        ours = [(self.bridge.host, self.bridge.port)] if self.bridge else []
        return tuple(sorted({*self.discovery.bridges, *ours}))

    # The PlaneReader the dashboard and /metrics get (controlplane/view.py).

    def view(self) -> PlaneView:
        runtimes, acks = tuple(self.discovery.instances()), tuple(self.acks.all())
        return PlaneView(
            pipelines=tuple(self.pipelines),
            history=self.history,
            runtimes=runtimes,
            acks=acks,
            connected=frozenset(s.node_id for s in acks if self.acks.is_connected(s.node_id)),
            streams_by_mode=self.acks.streams_by_mode(),
            snapshot_versions=self.reconciler.snapshot_versions(),
            snapshots_set=dict(self.reconciler.snapshots_set),
            push_latency=self.reconciler.push_latency,
            admin_calls=dict(self.admin.calls),
            consul=self.discovery.health(),
            pipelines_held_since=self.empty_hold.since if self._hold_timer is not None else None,
            consul_ui=f"{self.settings.consul.url}/ui/",
            envoy_admin=envoy_admin_urls(runtimes, self.settings.gateway_admin_port),
            kafka_bridges=self.kafka_bridges(),
            switch={name: self.switchboard.report(name) for name in self.switchboard.tracks},
            broken=dict(self.broken),
            translate_failed=dict(self.reconciler.failed),
            kafka_router_restarts=dict(self.kafka.router_restarts) if self.kafka else {},
            rollouts_driving=self.rollouts.driving,
            rollout_moves=self.rollouts.moves,
            scaling=self.autoscaler.report(),
            control_planes=self.peers.report(),
            readings=self.traffic_book.history.readings(),
            entered_at={v.pipeline.name: at for v in self.pipelines if (at := self._entered_at(v.pipeline.name))},
            stack=stack_processes(os.environ.get(STACK_STATE, "")),
            replay_reports=self.replays.reports,
            replays_running={name: t.id for name, t in self.live_trials().items()},
            monitoring=self.monitor.status,
            callers=self.callers.rows(),
            monitoring_page=self.monitor.page,
        )

    async def traffic(self) -> list[VariantTraffic]:
        """Observed traffic per pipeline/stage/variant, from every Envoy's own stats."""
        return per_variant([v.pipeline for v in self.pipelines], await self.traffic_book.stats())

    async def recent_traffic(self) -> list[VariantTraffic]:
        return await self.traffic_book.recent([v.pipeline for v in self.pipelines], self._entered_at)

    async def failing_deployments(self) -> list[Trouble]:
        """Deployed model versions whose replicas do not stay up, as their stack reported (none: Consul away)."""
        try:
            deployed = {(d.model, d.version) for d in await self.model_store.deployments()}
            return [t for key, t in sorted((await self.model_store.troubles()).items()) if key in deployed]
        except ModelStoreUnavailable as err:
            log.warning("deployments' troubles not read: %s", err)
            return []

    def _entered_at(self, name: str) -> float | None:
        track = self.switchboard.tracks.get(name)
        return track.entered_at if track and track.entry else None

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        # A task's last word (a lock given back to Consul) is bounded: a stop must never hang on a slow Consul.
        done, stuck = await asyncio.wait(self._tasks, timeout=STOP_TASKS_TIMEOUT) if self._tasks else (set(), set())
        for task in done:  # what a task ended with was logged by it; retrieved here so asyncio does not warn
            if not task.cancelled():
                task.exception()
        if stuck:
            log.warning("stopping: %d task(s) still busy after %.0f s, left behind", len(stuck), STOP_TASKS_TIMEOUT)
        for keeper in (self.identity, self.bridge_identity):
            if keeper is not None:
                await keeper.stop()
        if self.packages is not None:
            await self.packages.stop()
        for kind in ("bridge", "stats", "packages"):  # the key copies go with us
            shutil.rmtree(key_copies(kind), ignore_errors=True)
        for edge in (self.bridge, self.front):
            if edge is not None:
                await edge.deregister()
        if self._dashboard is not None:
            await self._dashboard.stop()
        if self._ui is not None:
            await self._ui.close()
        for edge in (self.bridge, self.front):
            if edge is not None:
                await edge.stop()
        if self.kafka is not None:
            await self.kafka.stop()
        if self._admin_server is not None:
            await self._admin_server.stop(0.5)
        await self.xds.stop(0.5)
        await self.peers.stop()
        await self.consul.close()
        await self.watch_consul.close()


async def serve(settings: Settings) -> None:
    plane = await ControlPlane(settings).start()
    # With thousands of runtimes each Consul answer allocates tens of thousands of short-lived
    # objects. Python's default thresholds promote them mid-parse and then pay for full
    # collections of 75-90 ms, the tail of every admin call (bench/consul_scale.py). Collect
    # young objects rarely (they mostly die by refcount first) and leave the start-up heap
    # (imports, protobuf descriptors) out of every scan.
    gc.set_threshold(GC_YOUNG, 20, 20)
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    told: list[str] = []  # the first signal's name (later ones change nothing)

    def on_signal(name: str) -> None:
        told[:] = told or [name]
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    log.info("ready pid=%d (SIGTERM or SIGINT stops it)", os.getpid())
    await stop.wait()
    began = time.monotonic()
    log.info("stopping (%s)", told[0] if told else "asked")
    await plane.stop()
    log.info("stopped after %.1f s", time.monotonic() - began)


def cmd_controlplane(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        asyncio.run(serve(settings_from(args)))
    except (OSError, ValueError) as err:
        raise CliError(str(err)) from err
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("controlplane", help="run the control plane (xDS + admin API)")
    add_arguments(parser)
    parser.set_defaults(handler=cmd_controlplane)
