"""Kafka transport: messages/s and end-to-end latency through the 3-stage pipeline on tansu,
and the same pipeline over HTTP in the same run (wrk, 32 connections).

Run: .venv/bin/python -m bench.kafka_throughput [--messages 5000 --runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench.common import median, percentile, running_stack
from bench.pipeline_hops import MODELS, POST_LUA, stage, wrk


async def kafka_run(bootstrap: str, topic_in: str, topic_out: str, messages: int) -> dict[str, float]:
    consumer = AIOKafkaConsumer(
        topic_out, bootstrap_servers=bootstrap, group_id=f"bench-{uuid.uuid4().hex[:6]}", auto_offset_reset="latest"
    )
    await consumer.start()
    await asyncio.sleep(3)  # the bench's own consumer has its partitions
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    run = uuid.uuid4().hex[:8].encode()
    started = time.time()
    sends = [
        await producer.send(
            topic_in, b'{"text": "the quick brown fox"}', headers=[("t0", str(time.time()).encode()), ("run", run)]
        )
        for _ in range(messages)
    ]
    await asyncio.gather(*sends)
    latencies: list[float] = []
    async with asyncio.timeout(600):
        while len(latencies) < messages:
            for records in (await consumer.getmany(timeout_ms=500, max_records=1000)).values():
                now = time.time()
                for r in records:
                    headers = dict(r.headers or [])
                    if headers.get("run") == run:
                        latencies.append((now - float(headers["t0"])) * 1000)
    elapsed = time.time() - started
    await producer.stop()
    await consumer.stop()
    return {"rate": messages / elapsed, "p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="mll-bench-kafka-"))
    models = ("tokenize", "count", "score")
    stack = {
        "name": "bench-kafka",
        "kafka": True,
        "runtimes": [{"model": m, "version": "v1", "target": f"{MODELS}:{m}"} for m in models],
        "pipelines": [
            {"name": "kb", "transport": "kafka", "stages": [stage(m) for m in models]},
            {"name": "hb", "transport": "http", "stages": [stage(m) for m in models]},
        ],
    }
    (folder / "post.lua").write_text(POST_LUA)
    with running_stack(folder, stack) as (ports, _):
        bootstrap = f"127.0.0.1:{ports['kafka']}"
        kafka, http = [], []
        for _ in range(args.runs):
            kafka.append(asyncio.run(kafka_run(bootstrap, "mll.kb.in", "mll.kb.out", args.messages)))
            http.append(wrk(f"http://127.0.0.1:{ports['gateway']}/pipelines/hb", 32, 8, folder / "post.lua"))
        print(f"3-stage pipeline, median of {args.runs} runs ({args.messages} messages per Kafka run)")
        print(
            f"  kafka: {median([k['rate'] for k in kafka]):.0f} msg/s   "
            f"end-to-end p50 {median([k['p50'] for k in kafka]):.0f} ms  p99 {median([k['p99'] for k in kafka]):.0f} ms"
        )
        print(
            f"  http:  {median([h['rps'] for h in http]):.0f} req/s  "
            f"p50 {median([h['p50'] for h in http]):.1f} ms  p99 {median([h['p99'] for h in http]):.1f} ms"
        )
        ratio = median([k["rate"] for k in kafka]) / median([h["rps"] for h in http])
        print(f"  kafka/http throughput ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
