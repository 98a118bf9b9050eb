"""The signatures of the model versions pipelines route to, read from the store for the gateway's OIP metadata.

A version's record never changes, so a signature once read is kept while a pipeline
routes to that version; a version without one (code, or not built yet) is asked
again after `RETRY` seconds, never on every reconcile. The map holds only versions
that pipelines name (bounded by the pipelines' own limits).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from contract.naming import model_cluster
from controlplane.models.store import BadPackage, ModelNotFound, ModelStore
from controlplane.pipeline.contracts import contract_variants
from controlplane.pipeline.model import Pipeline

RETRY = 30.0
PER_PASS = 50  # store reads per call: thousands of code-only versions never hold up a reconcile
MAX_LOOKUP = 500  # model versions read for one Apply (a pipeline names far fewer)
Pair = tuple[str, str]  # (model, version)


class SignatureBook:
    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.known: dict[Pair, str] = {}  # (model, version) -> its signature as JSON
        self.asked: dict[Pair, float] = {}  # versions without one -> when last asked (monotonic)

    async def follow(self, pairs: set[Pair]) -> bool:
        """Read the signatures not known yet; True when one was learnt (the gateway's metadata changes)."""
        for gone in set(self.known) - pairs:
            del self.known[gone]
        for gone in set(self.asked) - pairs:
            del self.asked[gone]
        now = time.monotonic()
        learnt = False
        due = [p for p in sorted(pairs - set(self.known)) if now - self.asked.get(p, -math.inf) >= RETRY]
        for pair in due[:PER_PASS]:
            self.asked[pair] = now
            try:
                text = await self._stored(pair)
            except Exception:  # the store away, a record that does not parse: asked again later
                continue
            if text:
                self.known[pair] = text
                del self.asked[pair]
                learnt = True
        return learnt

    async def contracts(self, pipeline: Pipeline) -> dict[Pair, dict[str, Any]]:
        """The contracts of every model version a pipeline names, read now (those without one left out)."""
        named = {(v.model, v.version) for s in pipeline.stages for v in contract_variants(s)}
        found: dict[Pair, Any] = {}
        for pair in sorted(named)[:MAX_LOOKUP]:
            text = self.known.get(pair) or await self._stored(pair)
            try:
                found[pair] = json.loads(text) if text else None
            except ValueError:
                continue
        return {pair: c for pair, c in found.items() if isinstance(c, dict)}

    async def _stored(self, pair: Pair) -> str:
        """A version's signature from the store ("": none, not built, or a name the store refuses)."""
        try:
            return (await self.store.get(*pair)).signature
        except (ModelNotFound, BadPackage):
            return ""

    def table(self) -> tuple[tuple[str, str], ...]:
        """(model cluster, signature JSON) pairs, as the translation's options carry them."""
        return tuple(sorted((model_cluster(m, v), text) for (m, v), text in self.known.items()))
