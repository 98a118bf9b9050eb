"""The runtime's HTTP server: aiohttp's web server against the SDK's own (runtime_sdk/wire.py).

Each server runs in a process of its own with the same handler (a stage's JSON in and out, two
headers), and wrk sends it the same POST with 32 connections over loopback TCP; the servers take
turns, in reverse order every other run. What is counted is the server process's CPU per request,
read from /proc. Medians of the runs, and the ratio within each run.

`--against REV` adds the SDK's server as of git revision REV (run from a worktree) to the same turns: a change
to the server measured against what came before it.

Run: .venv/bin/python -m bench.wire_server [--runs 5] [--seconds 5] [--against REV]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import checkout, median
from bench.pipeline_hops import wrk_folder
from controlplane.node import processes

SERVERS = ("aiohttp", "wire")


async def serve(kind: str, port: int) -> None:
    """One server until killed."""
    if kind == "aiohttp":
        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            body = json.dumps(json.loads(await request.read()))
            return web.Response(text=body, content_type="application/json", headers={"x-mll-served": "s=m:v1"})

        app = web.Application()
        app.router.add_post("/pipelines/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
    else:
        from runtime_sdk.http1 import Request, Response
        from runtime_sdk.wire import Server

        async def answer(request: Request) -> Response:
            body = json.dumps(json.loads(request.body)).encode()
            return Response(200, body, {"content-type": "application/json", "x-mll-served": "s=m:v1"})

        await Server(answer, 1 << 20).listen_tcp("127.0.0.1", port)
    await asyncio.Event().wait()


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one(kind: str, seconds: int, script: str, roots: dict[str, Path]) -> dict[str, float]:
    port = processes.free_port()
    argv = [sys.executable, "-m", "bench.wire_server", "--serve", kind.partition("@")[0], str(port)]
    url = f"http://127.0.0.1:{port}/pipelines/bench/v1/count"
    return served_cpu(argv, port, url, seconds, script, cwd=roots.get(kind))


def served_cpu(
    argv: list[str], port: int, url: str, seconds: int, script: str, cwd: Path | None = None
) -> dict[str, float]:
    """Start the server `argv` (listening on `port`; from `cwd`, whose code `python -m` imports), load it with wrk
    for `seconds`: its CPU per request."""
    server = subprocess.Popen(argv, cwd=cwd)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, f"{argv} did not start"
                time.sleep(0.1)
        subprocess.run(["wrk", "-t1", "-c32", "-d1s", "-s", script, url], capture_output=True, check=True)  # warm
        before = cpu_seconds(server.pid)
        out = subprocess.run(
            ["wrk", "-t1", "-c32", f"-d{seconds}s", "-s", script, url], capture_output=True, text=True, check=True
        ).stdout
        used = cpu_seconds(server.pid) - before
        found = re.search(r"(\d+) requests in", out)
        assert found and "Non-2xx" not in out, out
        requests = int(found.group(1))
        return {"req/s": requests / seconds, "cpu_us": used / requests * 1e6}
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--against", metavar="REV", help="also the SDK's server as of git revision REV")
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve[0], int(args.serve[1])))
        return
    _, script = wrk_folder("mll-bench-wire-")
    roots = {f"wire@{args.against}": checkout(args.against)} if args.against else {}
    kinds = [*SERVERS, *roots]
    runs: list[dict[str, dict[str, float]]] = []
    for n in range(args.runs):
        run: dict[str, Any] = {}
        for kind in kinds[:: -1 if n % 2 else 1]:
            run[kind] = one(kind, args.seconds, str(script), roots)
        ratio = run["wire"]["cpu_us"] / run["aiohttp"]["cpu_us"]
        print(
            f"run {n + 1}: "
            + ", ".join(f"{k} {v['cpu_us']:.1f} us {v['req/s']:,.0f} req/s" for k, v in run.items())
            + f"; wire/aiohttp CPU {ratio:.2f}",
            flush=True,
        )
        runs.append(run)
    for kind in kinds:
        print(
            f"{kind}: median {median([r[kind]['cpu_us'] for r in runs]):.1f} us of CPU per request, "
            f"{median([r[kind]['req/s'] for r in runs]):,.0f} req/s"
        )
    for kind in kinds[1:]:
        ratios = [r[kind]["cpu_us"] / r["aiohttp"]["cpu_us"] for r in runs]
        print(f"{kind}/aiohttp CPU per request: median {median(ratios):.2f}")
    for kind in roots:
        ratios = [r["wire"]["cpu_us"] / r[kind]["cpu_us"] for r in runs]
        print(f"wire/{kind} CPU per request: median {median(ratios):.2f}")


if __name__ == "__main__":
    main()
