"""The pipeline tax: per hop of the NLP example, how much of the latency is the model, the runtime SDK
around it, and the mesh on the way in (the caller's sidecar, the stage's sidecar, the network; for
the first hop also the gateway and the client's leg).

The NLP stack as `mllambda up` runs it (mTLS on every hop, same-host hops skipping the receiver's
sidecar, the runtimes' output through the gateway Envoy), and either with `security: plaintext`
(`--compare security`) or (`--compare colocated`) with the output through each runtime's sidecar
(`MLLAMBDA_COLOCATED=direct`) and with every hop through the receiver's sidecar (`ingress`); all up at once and
measured in turns; requests one at a time (`mllambda invoke`'s own client and x-mll-timing), medians
per run, the median of the runs.
Run: .venv/bin/python -m bench.hop_tax [--runs 3] [--requests 300] [--compare security|colocated]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
from pathlib import Path

from bench.common import median, nlp_stack, running_stack
from controlplane.invoke import hop_table, send

TEXT = {"text": "the pasta was delicious"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--compare", choices=["security", "colocated"], default="colocated")
    args = parser.parse_args()
    stack = nlp_stack()
    stack.pop("kafka", None)
    setups: dict[str, tuple[dict[str, str], dict[str, str]]] = {"mtls": ({}, {})}  # name: stack changes, env
    if args.compare == "colocated":
        setups["mtls, output through each sidecar"] = ({}, {"MLLAMBDA_COLOCATED": "direct"})
        setups["mtls, every hop through the ingress"] = ({}, {"MLLAMBDA_COLOCATED": "ingress"})
    else:
        setups["plaintext"] = ({"security": "plaintext"}, {})
    runs: dict[str, list[list[dict[str, float]]]] = {name: [] for name in setups}
    with contextlib.ExitStack() as stacks:
        urls = {}
        for security, (changes, env) in setups.items():  # both up at once, measured in turns: same minute
            folder = Path(tempfile.mkdtemp(prefix="mll-bench-tax-"))
            ports, _ = stacks.enter_context(running_stack(folder, {**stack, **changes}, env))
            urls[security] = f"http://127.0.0.1:{ports['gateway']}/pipelines/nlp"
            asyncio.run(send(urls[security], TEXT, 30, concurrency=1))  # warm
        for _ in range(args.runs):
            for security, url in urls.items():
                sent = asyncio.run(send(url, TEXT, args.requests, concurrency=1))
                assert not sent.errors, sent.errors[:3]
                runs[security].append(hop_table(sent.hops))
    for security, measured in runs.items():
        print(f"\n{security}: median of {args.runs} runs x {args.requests} requests, one at a time (ms)")
        print(f"{'stage':<12}{'model':>8}{'sdk':>8}{'mesh':>8}")
        for i, hop in enumerate(measured[0]):
            parts = [median([run[i][part] for run in measured]) for part in ("model_ms", "sdk_ms", "mesh_ms")]
            print(f"{hop['stage']:<12}" + "".join(f"{x:>8.2f}" for x in parts))


if __name__ == "__main__":
    main()
