"""Split accuracy: observed share of a 90/10 and a 99/1 split over 10,000 requests each,
through the real stack (gateway + sidecars), counted from each answer's x-mll-served header.

Run: .venv/bin/python -m bench.split_accuracy [--requests 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import tempfile
from pathlib import Path

import yaml

from bench.common import CLI, running_stack
from bench.pipeline_hops import MODELS, stage
from controlplane.invoke import send, split_table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=10_000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="mll-bench-split-"))
    runtimes = [{"model": m, "version": "v1", "target": f"{MODELS}:{m}"} for m in ("tokenize", "count", "score")]
    runtimes.append({"model": "score", "version": "v2", "target": f"{MODELS}:score_v2"})
    with running_stack(folder, {"name": "bench-split", "runtimes": runtimes}) as (ports, env):
        for v1, v2 in ((90, 10), (99, 1)):
            weights = [
                {"model": "score", "version": "v1", "weight": v1},
                {"model": "score", "version": "v2", "weight": v2},
            ]
            spec = {
                "name": "split",
                "stages": [stage("tokenize"), stage("count"), {"name": "score", "variants": weights}],
            }
            (folder / "p.yaml").write_text(yaml.safe_dump(spec))
            subprocess.run(
                [*CLI, "apply", "-f", str(folder / "p.yaml")], env=env, check=True, stdout=subprocess.DEVNULL
            )
            url = f"http://127.0.0.1:{ports['gateway']}/pipelines/split"
            asyncio.run(send(url, {"text": "a b"}, 20))  # config reached every Envoy
            sent = asyncio.run(send(url, {"text": "a b"}, args.requests, concurrency=16))
            bodies, errors = sent.bodies, sent.errors
            counts = split_table(sent.served)["score"]
            share = counts.get("score:v2", 0) / max(1, sum(counts.values()))
            print(
                json.dumps(
                    {
                        "configured_v2": v2 / 100,
                        "observed_v2": round(share, 4),
                        "ok": len(bodies),
                        "errors": len(errors),
                        "off_by_pp": round(100 * abs(share - v2 / 100), 2),
                    }
                )
            )


if __name__ == "__main__":
    main()
