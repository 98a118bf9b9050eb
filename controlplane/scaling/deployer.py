"""`mllambda deploy` on Kubernetes: a Deployment per deployed model version, made and removed by the control plane.

With `--scaler kubernetes`, the control plane that holds the autoscaler's lock makes the cluster match the deploy
records (`<prefix>-deploy/`): each deployed version gets the Deployment that `mllambda render kubernetes` would
write for it (an init container fetches the package and builds its environment into a shared volume, KServe's
storage-initializer pattern; then the runtime and its Envoy). It is created, or patched when the record changed
(a strategic merge patch: an autoscaled one has no `spec.replicas`, so the scaler's count stands); one whose
record is gone is deleted. Only Deployments labelled as ours (`LABEL`) are ever deleted: those a person applied
from rendered manifests are not this code's to remove.

Failure behaviour: an API call refused is logged once per version and change and tried again on the next sync
(every SYNC_EVERY seconds, or at once when the records change); nothing else waits for it. The manifest itself is
rendered by the caller (plane.py wires `stack/kubernetes.py`'s renderer), so this module stays the API's hands.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from controlplane.models.store import Deployment

log = logging.getLogger("mllambda.deployer")
LABEL = "mllambda.io/deployed-by"  # = "deploy" on the Deployments this module makes (and alone may delete)
SYNC_EVERY = 30.0  # seconds between syncs while the records do not change (a Deployment deleted by hand returns)

Render = Callable[[Deployment], dict[str, Any]]  # a deploy record -> its Deployment manifest


def apps_api() -> Any:
    """The Kubernetes apps/v1 client: the pod's service account in a cluster, else the user's kubeconfig."""
    from kubernetes import client, config  # optional: `pip install mllambda[kubernetes]`

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.AppsV1Api()


class KubernetesDeployer:
    def __init__(self, namespace: str, render: Render, api: Any = None) -> None:
        self.namespace = namespace
        self.render = render
        self._api = api
        self.applied: dict[str, str] = {}  # Deployment name -> the manifest last applied (as JSON)
        self.failed: dict[str, str] = {}  # Deployment name -> the manifest whose apply was refused (said once)
        self.synced_at = 0.0

    def api(self) -> Any:
        if self._api is None:
            self._api = apps_api()
        return self._api

    def manifests(self, records: Sequence[Deployment]) -> dict[str, dict[str, Any]]:
        """Name -> Deployment manifest of each deploy record, labelled as ours."""
        found = {}
        for record in records:
            manifest = self.render(record)
            manifest["metadata"].setdefault("labels", {})[LABEL] = "deploy"
            found[manifest["metadata"]["name"]] = manifest
        return found

    async def sync(self, records: Sequence[Deployment], now: float | None = None) -> None:
        """Make the cluster's Deployments of deployed versions match the records (see the module's note)."""
        now = time.monotonic() if now is None else now
        wanted = self.manifests(records)
        texts = {name: json.dumps(m, sort_keys=True) for name, m in wanted.items()}
        due = now - self.synced_at >= SYNC_EVERY
        settled = {**self.applied, **self.failed}  # a refused one waits for the next due sync, or a change
        if not due and all(settled.get(n) == t for n, t in texts.items()) and set(self.applied) <= set(texts):
            return
        self.synced_at = now if due else self.synced_at
        for name, manifest in wanted.items():
            if due or settled.get(name) != texts[name]:
                await self._apply(name, manifest, texts[name])
        undeployed = set(self.applied) - set(wanted)
        for name in await self._ours() if due or undeployed else []:
            if name not in wanted:
                if (err := await self._call("delete_namespaced_deployment", name, self.namespace)) is None:
                    log.info("deployment=%s deleted (its model version was undeployed)", name)
                else:
                    log.warning("deployment=%s not deleted: %s", name, str(err)[:300])
                self.applied.pop(name, None)
        for name in [n for n in self.failed if n not in wanted]:
            del self.failed[name]

    async def _apply(self, name: str, manifest: dict[str, Any], text: str) -> None:
        err = await self._call("create_namespaced_deployment", self.namespace, manifest)
        if err is not None and getattr(err, "status", None) == 409:  # it exists: patched instead
            err = await self._call("patch_namespaced_deployment", name, self.namespace, manifest)
        if err is None:
            self.applied[name] = text
            self.failed.pop(name, None)
            log.info("deployment=%s applied", name)
            return
        if self.failed.get(name) != text:
            log.warning("deployment=%s not applied (tried again in %.0f s): %s", name, SYNC_EVERY, str(err)[:300])
        self.failed[name] = text

    async def _ours(self) -> list[str]:
        """The Deployments this module made (by their label), as the API lists them now."""
        try:
            listed = await asyncio.to_thread(
                self.api().list_namespaced_deployment, self.namespace, label_selector=f"{LABEL}=deploy"
            )
        except Exception as err:  # the API away: nothing is deleted on a guess
            log.warning("deployments not listed: %s", str(err)[:300])
            return []
        return [item.metadata.name for item in listed.items]

    async def _call(self, method: str, *args: Any) -> Exception | None:
        """One API call in a thread (the client blocks): None, or what it raised."""
        try:
            await asyncio.to_thread(getattr(self.api(), method), *args)
        except Exception as err:
            return err
        return None
