"""What Envoy's own check adds to `apply`: `envoy --mode validate` on a new pipeline shape vs a cached one.

A new shape (a stage, a branch, a new model version) runs the Envoy binary once;
a weight change (the common small change, and every rollout step) hits the cache.
Run: .venv/bin/python -m bench.validate [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import replace

from bench.common import median, percentile
from controlplane.admin.envoy_check import EnvoyValidator
from controlplane.pipeline.model import Pipeline
from controlplane.pipeline.spec import parse_pipeline


def pipeline(stages: int, n: int) -> Pipeline:
    return parse_pipeline(
        {
            "name": f"p{n}",
            "stages": [
                {
                    "name": f"s{k}",
                    "variants": [
                        {"model": f"m{k}", "version": "v1", "weight": 9},
                        {"model": f"m{k}", "version": "v2", "weight": 1},
                    ],
                }
                for k in range(stages)
            ],
        }
    )


async def main(runs: int) -> None:
    validator = EnvoyValidator()
    print(f"envoy --mode validate, {runs} runs each (ms)")
    print(f"  {'pipeline':<22}{'new shape p50':>14}{'p99':>8}{'weights only p50':>18}{'p99':>8}")
    for stages in (3, 10, 32):
        fresh, cached = [], []
        for n in range(runs):
            p = pipeline(stages, n)
            started = time.perf_counter()
            await validator.check(p)
            fresh.append((time.perf_counter() - started) * 1000)
            shifted = [(replace(s.variants[0], weight=5), replace(s.variants[1], weight=5)) for s in p.stages]
            reweighted = replace(
                p, stages=tuple(replace(s, variants=v) for s, v in zip(p.stages, shifted, strict=True))
            )
            started = time.perf_counter()
            await validator.check(reweighted)
            cached.append((time.perf_counter() - started) * 1000)
        print(
            f"  {f'{stages} stages, 2 variants':<22}{median(fresh):>14.1f}{percentile(fresh, 99):>8.1f}"
            f"{median(cached):>18.3f}{percentile(cached, 99):>8.3f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    asyncio.run(main(parser.parse_args().runs))
