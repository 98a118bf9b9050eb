"""Envoy checks a pipeline before anything is written or pushed: `envoy --mode validate`.

Our validator (spec.py) knows our rules; Envoy has its own (a direct response
body is at most 4,096 bytes, say). At apply time the pipeline is translated as
if it were the only one, for the gateway and one sidecar per model version,
rendered as one static bootstrap and given to the same Envoy binary the fleet
runs. A refusal comes back with Envoy's own words and nothing is stored.

Validity does not depend on weights or on a rollout's progress, so the result
is cached by the pipeline's shape (weights set to 1, rollout state dropped): a
weight change, the common small change, costs nothing here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

from contract.service import RuntimeService
from controlplane.node.tools import find_envoy
from controlplane.pipeline.model import Pipeline, PipelineVersion
from controlplane.pipeline.spec import pipeline_to_dict
from controlplane.translate.pipelines import Deployment, Options, translate
from controlplane.translate.static import static_bootstrap

log = logging.getLogger("mllambda.validate")
CACHED = 1024  # pipeline shapes remembered
TIMEOUT = 10.0
_NOISE = re.compile(r"^\[[^\]]*\]\[[^\]]*\]\[[^\]]*\]\[[^\]]*\] (\[[^\]]*\] )?")


class EnvoyRefuses(ValueError):
    """Envoy would reject the config this pipeline becomes; the message is Envoy's."""


def shape(pipeline: Pipeline) -> str:
    """What validity depends on: the spec without weights or rollout state."""
    spec = pipeline_to_dict(pipeline)
    for stage in spec["stages"]:
        for group in [stage.get("variants", []), *[b["variants"] for b in stage.get("branches", [])]]:
            for variant in group:
                variant["weight"] = 1
        for holder in [stage, *stage.get("branches", [])]:
            if "rollout" in holder:
                holder["rollout"] = {"candidate": holder["rollout"]["candidate"]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def snapshots_of(pipeline: Pipeline) -> dict[str, object]:
    """The pipeline alone, for the gateway and one made-up sidecar per model version it names."""
    instances = [
        RuntimeService(f"check-{n}", model, version, "127.0.0.1", 1, f"/c{n}.sock", 2, 3, f"/e{n}.sock", passing=True)
        for n, (model, version) in enumerate(sorted(pipeline.models()))
    ]
    version = PipelineVersion(pipeline, 1, "", "check")
    return dict(translate([Deployment.steady(version)], instances, Options()))


class EnvoyValidator:
    def __init__(self, envoy: Path | None = None) -> None:
        self.envoy = envoy or find_envoy()
        self._known: OrderedDict[str, str] = OrderedDict()  # shape -> "" (valid) or Envoy's refusal
        self.runs = 0
        self.last_seconds = 0.0

    async def check(self, pipeline: Pipeline) -> None:
        """Raises EnvoyRefuses with Envoy's message; returns when Envoy accepts (or no Envoy is installed)."""
        if self.envoy is None:
            return
        key = shape(pipeline)
        if key not in self._known:
            self._known[key] = await self._run(pipeline)
            if len(self._known) > CACHED:
                self._known.popitem(last=False)
        self._known.move_to_end(key)
        if self._known[key]:
            raise EnvoyRefuses(f"Envoy refuses this pipeline's config: {self._known[key]}")

    async def _run(self, pipeline: Pipeline) -> str:
        started = time.monotonic()
        bootstrap = static_bootstrap(snapshots_of(pipeline))  # type: ignore[arg-type]
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="mll-check-") as config:
            json.dump(bootstrap, config)
            config.flush()
            process = await asyncio.create_subprocess_exec(
                str(self.envoy),
                "--mode",
                "validate",
                "-c",
                config.name,
                "--log-level",
                "error",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            try:
                output, _ = await asyncio.wait_for(process.communicate(), TIMEOUT)
            except TimeoutError:
                process.kill()
                return ""  # a validator that hangs blocks nobody: the fleet's own NACKs still protect
        self.runs += 1
        self.last_seconds = time.monotonic() - started
        log.info("envoy validate pipeline=%s rc=%s seconds=%.3f", pipeline.name, process.returncode, self.last_seconds)
        return "" if process.returncode == 0 else _reason(output.decode(errors="replace"))


def _reason(output: str) -> str:
    """Envoy's error line, without its log prefix or our temporary file's name."""
    lines = [_NOISE.sub("", line).strip() for line in output.splitlines() if line.strip()]
    text = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "rejected")
    return re.sub(r"error initializing configuration '[^']*': ", "", text)[:500]
