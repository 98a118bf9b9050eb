"""One real round trip per component: the ground every other test stands on."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import consul.aio
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from controlplane.node import processes

pytestmark = pytest.mark.smoke


async def test_consul_registers_and_reads_back_a_service(consul_agent: Any) -> None:
    client = consul.aio.Consul(host="127.0.0.1", port=consul_agent.http_port)
    try:
        await client.agent.service.register(
            "smoke-model", service_id="smoke-1", address="127.0.0.1", port=9999, tags=["v1"]
        )
        _, nodes = await client.catalog.service("smoke-model")
        assert [(n["ServiceID"], n["ServicePort"], n["ServiceTags"]) for n in nodes] == [("smoke-1", 9999, ["v1"])]
        await client.agent.service.deregister("smoke-1")
        _, nodes = await client.catalog.service("smoke-model")
        assert nodes == []
    finally:
        await client.close()


async def test_envoy_proxies_http_to_a_local_server(start_envoy: Any) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path, "via": request.headers.get("x-via")})

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    upstream_port, listen_port = processes.free_port(), processes.free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()
    try:
        envoy = await asyncio.to_thread(start_envoy, static_proxy(listen_port, upstream_port))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{listen_port}/hello") as resp:
                assert resp.status == 200
                assert await resp.json() == {"path": "/hello", "via": "envoy"}
        status, stats = envoy.admin("/stats?filter=upstream_rq_200")
        assert status == 200 and "cluster.upstream.upstream_rq_200: 1" in stats
    finally:
        await runner.cleanup()


async def test_kafka_round_trip_loses_no_message(kafka_bootstrap: str) -> None:
    topic = "smoke-roundtrip"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(100):
            await producer.send_and_wait(topic, str(i).encode())
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest", group_id="smoke"
    )
    await consumer.start()
    received: list[int] = []
    try:
        async with asyncio.timeout(30):
            while len(received) < 100:
                batch = await consumer.getmany(timeout_ms=1000)
                for records in batch.values():
                    received.extend(int(r.value) for r in records)
    finally:
        await consumer.stop()
    assert sorted(received) == list(range(100))


def static_proxy(listen_port: int, upstream_port: int) -> dict[str, Any]:
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                    "filter_chains": [{"filters": [hcm_filter()]}],
                }
            ],
            "clusters": [
                {
                    "name": "upstream",
                    "type": "STATIC",
                    "load_assignment": {
                        "cluster_name": "upstream",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": upstream_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        }
    }


ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def hcm_filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "ingress",
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"prefix": "/"},
                                "route": {"cluster": "upstream"},
                                "request_headers_to_add": [{"header": {"key": "x-via", "value": "envoy"}}],
                            }
                        ],
                    }
                ]
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": ROUTER_TYPE},
                }
            ],
        },
    }
