"""Payloads of the size ML sends through a 3-stage pipeline: bodies of 1 KB, 64 KB, 1 MB and 8 MB (issue 42).

Three stages that pass their input on (examples.trivial.models:echo: the transport's cost, not a model's): the
plain aiohttp chain (no mesh: the limit) against ML Lambda over http and over Unix sockets, each system started
once per run and loaded with wrk at every size (fewer connections for bigger bodies), systems taking turns
(reversed every other run). Per size and system: requests/s, MB/s of request bodies, p50/p99, CPU per MB of
request body (every process of the system, from /proc) and the system's peak RSS (VmHWM summed). Medians of
the runs, and ML Lambda against the chain within each run.

`--burst N`: instead, N requests of 8 MB at once into each system (one run): how each request ended (status, or
the client's error), how long the burst took, and each process role's peak RSS (the runtimes' against their
--body-budget, docs/architecture.md "Payload sizes").

`--oip`: instead, ML Lambda (http) loaded with the same sizes as JSON text and as an Open Inference Protocol request
whose tensor (FP32, the body's size) travels in the binary extension, side by side in each run.

Run: .venv/bin/python -m bench.payloads [--runs 3] [--seconds 6] [--peers] [--transports] [--burst 64] [--oip]
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import contextlib
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp

from bench.common import cpu_spent, median, memory_mib, process_cpu, running_stack
from bench.peers import bento, ray
from bench.pipeline_hops import MODELS, plain_chain, stage, wrk, wrk_folder

SIZES = {"1 KB": 1024, "64 KB": 64 * 1024, "1 MB": 1024 * 1024, "8 MB": 8 * 1024 * 1024}
CONNECTIONS = {"1 KB": 32, "64 KB": 16, "1 MB": 8, "8 MB": 4}
STAGES = ("e1", "e2", "e3")  # three model versions, each its own process, all answering with their input
SYSTEMS = {
    "plain aiohttp chain": ("plain", ""),
    "ML Lambda, http": ("mllambda", "http"),
    "ML Lambda, uds": ("mllambda", "uds"),
}
PEERS = {"Ray Serve": ("ray", ""), "BentoML": ("bento", "")}  # --peers: installed into .tools/ on first use
# --transports: the pipeline over Kafka (HTTP in at the gateway, through the bridge and topics), and mTLS on every hop
TRANSPORTS = {"ML Lambda, http + mTLS": ("mllambda", "http+mtls"), "ML Lambda, kafka": ("mllambda", "kafka")}


def body(size: int) -> str:
    return json.dumps({"text": "x" * (size - len(json.dumps({"text": ""})))})


@contextlib.contextmanager
def system(folder: Path, kind: str, transport: str) -> Iterator[str]:
    if kind == "plain":
        with plain_chain(folder, models=("echo", "echo", "echo")) as url:
            yield url
        return
    if kind == "ray":
        with ray(folder, optimized=False, app="echo") as url:
            yield url
        return
    if kind == "bento":
        with bento(folder, access_log=False, service="EchoPipeline") as url:
            yield url
        return
    transport, _, security = transport.partition("+")
    stack = {
        "name": "payloads",
        **({"security": security} if security else {}),
        **({"kafka": True} if transport == "kafka" else {}),
        "runtimes": [{"model": m, "version": "v1", "target": f"{MODELS}:echo"} for m in STAGES],
        "pipelines": [{"name": "big", "transport": transport, "stages": [stage(m) for m in STAGES]}],
    }
    with running_stack(folder, stack) as (ports, _):
        yield f"http://127.0.0.1:{ports['gateway']}/pipelines/big"


def measure(url: str, folder: Path, size_name: str, seconds: int) -> dict[str, float]:
    size, script = SIZES[size_name], folder / f"post-{size_name.replace(' ', '')}.lua"
    text = body(size)
    script.write_text(f'wrk.method = "POST"\nwrk.body = \'{text}\'\nwrk.headers["Content-Type"] = "application/json"\n')
    request = urllib.request.Request(url, data=text.encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        if json.loads(resp.read()) != json.loads(text):
            raise SystemExit(f"{url} did not answer a {size_name} body with itself")
    wrk(url, CONNECTIONS[size_name], 1, script)  # warm-up
    before = process_cpu()
    result = wrk(url, CONNECTIONS[size_name], seconds, script)
    spent = cpu_spent(before, process_cpu())
    megabytes = result["requests"] * size / 1e6
    result["mb_s"] = result["rps"] * size / 1e6
    result["cpu_us_per_mb"] = sum(spent.values()) / megabytes * 1e6 if megabytes else 0.0
    result["rss"] = memory_mib({role for role, s in spent.items() if s > 0}, "VmHWM")
    result.update({f"cpu {role}": seconds / megabytes * 1e6 for role, seconds in spent.items() if megabytes})
    return result


async def burst(url: str, count: int, size: int) -> tuple[collections.Counter[str], float]:
    """`count` requests of `size` bytes at once: how each ended, and the seconds until the last did."""
    text, ended = body(size).encode(), collections.Counter[str]()
    headers = {"content-type": "application/json"}

    async def one(session: aiohttp.ClientSession) -> None:
        try:
            async with session.post(url, data=text, headers=headers) as resp:
                answer = await resp.read()
                right = resp.status != 200 or len(answer) >= size - 2  # the body came back (compact JSON)
                ended[f"{resp.status}" if right else f"{resp.status}, body cut short"] += 1
        except (aiohttp.ClientError, TimeoutError) as err:
            ended[type(err).__name__] += 1

    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=count)) as session:
        await asyncio.gather(*(one(session) for _ in range(count)))
    return ended, time.perf_counter() - started


def peak_mib(pid: int) -> float:
    with contextlib.suppress(OSError, StopIteration):
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024
    return 0.0


def bursts(folder: Path, count: int) -> None:
    print(f"| system | {count} x 8 MB at once: how they ended | seconds | peak RSS MiB (summed by process role) |")
    print("|---|---|---|---|")
    for index, (name, (kind, transport)) in enumerate(SYSTEMS.items()):
        where = folder / f"burst-system{index}"
        where.mkdir()
        with system(where, kind, transport) as url:
            roles = {role for role, _ in process_cpu().values()}
            ended, seconds = asyncio.run(burst(url, count, SIZES["8 MB"]))
            peaks = ", ".join(f"{role} {memory_mib({role}, 'VmHWM'):,.0f}" for role in sorted(roles))
            largest = max((peak_mib(pid) for pid, (role, _) in process_cpu().items() if "runtime" in role), default=0)
            peaks += f"; the largest runtime {largest:,.0f}" if largest else ""
            told = ", ".join(f"{n} {status}" for status, n in sorted(ended.items()))
            print(f"| {name} | {told} | {seconds:.1f} | {peaks} |", flush=True)


def oip_request(size: int) -> tuple[bytes, int]:
    """An inference request whose one FP32 tensor of `size` bytes follows its JSON header (the binary extension)."""
    count = size // 4
    raw = array.array("f", (float(i % 1000) for i in range(count))).tobytes()
    tensor = {"name": "text", "shape": [count], "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
    header = json.dumps({"inputs": [tensor]}).encode()
    return header + raw, len(header)


def measure_oip(url: str, folder: Path, size_name: str, seconds: int) -> dict[str, float]:
    """`measure` for an OIP request in the binary extension at `url` (/v2/models/P/infer)."""
    body, header_length = oip_request(SIZES[size_name])
    data = folder / f"oip-{size_name.replace(' ', '')}.bin"
    data.write_bytes(body)
    script = folder / f"oip-{size_name.replace(' ', '')}.lua"
    script.write_text(
        f'local f = io.open("{data}", "rb")\nwrk.body = f:read("*a")\nf:close()\nwrk.method = "POST"\n'
        f'wrk.headers["Content-Type"] = "application/octet-stream"\n'
        f'wrk.headers["Inference-Header-Content-Length"] = "{header_length}"\n'
    )
    request = urllib.request.Request(url, data=body, headers={"inference-header-content-length": str(header_length)})
    with urllib.request.urlopen(request, timeout=60) as resp:
        outputs = json.loads(resp.read())["outputs"]
        if outputs[0]["shape"] != [SIZES[size_name] // 4]:
            raise SystemExit(f"{url} did not answer the {size_name} tensor with itself: {outputs[0]['shape']}")
    wrk(url, CONNECTIONS[size_name], 1, script)  # warm-up
    result = wrk(url, CONNECTIONS[size_name], seconds, script)
    result["mb_s"] = result["rps"] * SIZES[size_name] / 1e6
    return result


def oip_runs(folder: Path, runs: int, seconds: int) -> None:
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    for run in range(runs):
        where = folder / f"oip-run{run}"
        where.mkdir()
        with system(where, "mllambda", "http") as url:
            oip_url = url.replace("/pipelines/big", "/v2/models/big/infer")
            for size_name in SIZES:
                for kind in ("JSON text", "OIP binary tensor")[:: -1 if run % 2 else 1]:
                    how = measure if kind == "JSON text" else measure_oip
                    found = how(url if kind == "JSON text" else oip_url, where, size_name, seconds)
                    rows.setdefault((size_name, kind), []).append(found)
                    print(f"   run {run + 1}/{runs} {size_name} {kind}: {found['rps']:,.0f} req/s", flush=True)
    print(f"\nML Lambda, http, 3 stages passing the body on; medians of {runs} runs")
    print("| body | as | req/s | MB/s | p50 ms | p99 ms | against JSON text |")
    print("|---|---|---|---|---|---|---|")
    for size_name in SIZES:
        text = rows[(size_name, "JSON text")]
        for kind in ("JSON text", "OIP binary tensor"):
            runs_of = rows[(size_name, kind)]
            mid = {k: median([r[k] for r in runs_of]) for k in ("rps", "mb_s", "p50", "p99")}
            ratio = median([a["rps"] / b["rps"] for a, b in zip(runs_of, text, strict=True)])
            print(
                f"| {size_name} | {kind} | {mid['rps']:,.0f} | {mid['mb_s']:,.1f} | {mid['p50']:.1f} | "
                f"{mid['p99']:.1f} | {ratio:.2f}x |"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--burst", type=int, default=0, help="N requests of 8 MB at once instead (one run)")
    parser.add_argument("--peers", action="store_true", help="Ray Serve and BentoML too")
    parser.add_argument("--transports", action="store_true", help="ML Lambda over Kafka and with mTLS too")
    parser.add_argument("--oip", action="store_true", help="ML Lambda, JSON text against OIP binary tensors")
    args = parser.parse_args()
    if args.peers:
        SYSTEMS.update(PEERS)
    if args.transports:
        SYSTEMS.update(TRANSPORTS)
    folder, _ = wrk_folder("mll-bench-payloads-")
    if args.burst:
        bursts(folder, args.burst)
        return
    if args.oip:
        oip_runs(folder, args.runs, args.seconds)
        return
    rows: dict[tuple[str, str], list[dict[str, float]]] = {(n, s): [] for n in SYSTEMS for s in SIZES}
    started = time.time()
    for run in range(args.runs):
        for index, (name, (kind, transport)) in list(enumerate(SYSTEMS.items()))[:: -1 if run % 2 else 1]:
            where = folder / f"run{run}-system{index}"
            where.mkdir()
            with system(where, kind, transport) as url:
                for size_name in SIZES:
                    rows[(name, size_name)].append(measure(url, where, size_name, args.seconds))
                    print(
                        f"   run {run + 1}/{args.runs} {name} {size_name}: "
                        f"{rows[(name, size_name)][-1]['rps']:,.0f} req/s",
                        flush=True,
                    )
    print(f"\n3 stages passing the body on; wrk {args.seconds} s per size; medians of {args.runs} runs")
    print("| body | system | req/s | MB/s | p50 ms | p99 ms | CPU us per MB | peak RSS MiB | req/s against the chain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size_name in SIZES:
        chain = rows[("plain aiohttp chain", size_name)]
        for name in SYSTEMS:
            runs = rows[(name, size_name)]
            mid = {k: median([r[k] for r in runs]) for k in runs[0]}
            ratio = median([a["rps"] / b["rps"] for a, b in zip(runs, chain, strict=True)])
            print(
                f"| {size_name} | {name} | {mid['rps']:,.0f} | {mid['mb_s']:,.1f} | {mid['p50']:.1f} | "
                f"{mid['p99']:.1f} | {mid['cpu_us_per_mb']:,.0f} | {mid['rss']:,.0f} | {ratio:.2f}x |"
            )
    print("\nCPU us per MB by process role (medians)")
    for (name, size_name), runs in rows.items():
        roles = sorted({k for r in runs for k in r if k.startswith("cpu ")})
        parts = ", ".join(f"{k[4:]} {median([r.get(k, 0.0) for r in runs]):,.0f}" for k in roles)
        print(f"- {size_name}, {name}: {parts}")
    print(f"\n({time.time() - started:.0f} s; logs in {folder})")


if __name__ == "__main__":
    main()
