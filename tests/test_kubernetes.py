"""deploy/kubernetes/: rendered from the stack file, valid for the Kubernetes API, runnable by our own CLI;
and the kubernetes scaler's request as the API server receives it (no cluster is reachable here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from aiohttp import web

from controlplane.cli import build_parser
from controlplane.config import PROJECT_ROOT
from controlplane.node import launch
from controlplane.scaling.policy import Policy
from controlplane.scaling.scaler import KubernetesBackend
from controlplane.stack.file import load_stack
from controlplane.stack.kubernetes import FILES, as_text, render

DEPLOY = PROJECT_ROOT / "deploy" / "kubernetes"
STACK = PROJECT_ROOT / "examples" / "nlp" / "stack.yaml"
KUBERNETES = "1.37"
POD = {
    "POD_IP": "10.1.0.7",
    "HOST_IP": "10.0.0.3",
    "POD_NAME": "runtime-classifier-v1-7d9f-x2x4q",
    "POD_NAMESPACE": "mllambda",
}


def committed() -> dict[str, list[dict[str, Any]]]:
    return {name: [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d] for name in FILES}


def containers() -> list[dict[str, Any]]:
    found = []
    for documents in committed().values():
        for d in documents:
            if d["kind"] == "Deployment":
                pod = d["spec"]["template"]["spec"]
                found += pod.get("initContainers", []) + pod["containers"]
    return found


def test_the_committed_manifests_are_what_the_stack_file_renders() -> None:
    rendered = render(load_stack(STACK))
    for name in FILES:
        assert (DEPLOY / name).read_text() == as_text(rendered[name]), (
            f"deploy/kubernetes/{name} is stale: run `mllambda render kubernetes -f examples/nlp/stack.yaml "
            "-o deploy/kubernetes`"
        )


def test_every_manifest_validates_against_the_kubernetes_schema() -> None:
    kinds = []
    for documents in committed().values():
        for document in documents:
            if document["kind"] == "Kustomization":
                assert sorted(document["resources"]) == sorted(FILES[1:])
                assert all((DEPLOY / r).exists() for r in document["resources"])
                continue
            kubernetes_validate.validate(document, KUBERNETES, strict=True)  # raises with the field's path
            kinds.append(document["kind"])
    assert {"Deployment", "Service", "ServiceAccount", "Role", "RoleBinding", "ConfigMap"} <= set(kinds)
    assert "PersistentVolumeClaim" in kinds  # the control planes' shared model store
    with pytest.raises(kubernetes_validate.ValidationError):  # the check itself bites
        broken = committed()["gateway.yaml"][0]
        broken["spec"]["replicas"] = "one"
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_every_command_line_in_the_pods_parses_with_our_own_cli() -> None:
    parser, seen = build_parser(), set()
    for container in containers():
        defined = {e["name"] for e in container["env"]}
        argv = container["args"]
        used = set(re.findall(r"\$\(([A-Z_]+)\)", " ".join(argv)))
        assert used <= defined, (container["name"], used - defined)  # every $(VAR) comes from the pod
        args = parser.parse_args([re.sub(r"\$\(([A-Z_]+)\)", lambda m: POD[m.group(1)], a) for a in argv])
        seen.add(argv[0])
        if argv[0] == "runtime":
            launch.checked_service_id(args)
            assert launch.advertised(args) == POD["POD_IP"]  # beyond loopback, allowed because of mtls
            assert args.no_sidecar and args.sidecar_tls_dir.endswith(f"{POD['POD_NAME']}-tls")
        if argv[0] in ("runtime", "prepare") and getattr(args, "package", True):
            # a package's runtime starts from what its init container put in the shared volume
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert any(args.model_store.startswith(m + "/") for m in mounts if m != "/var/run/mllambda"), container
            assert args.packages_from == "controlplane:18004"
        if argv[0] == "sidecar" and args.node_id != "gateway":
            assert args.config_dir + f"/{args.node_id}-tls" == args_of_pair(container, "runtime").sidecar_tls_dir
    assert seen == {"controlplane", "sidecar", "runtime", "prepare"}


def args_of_pair(sidecar: dict[str, Any], name: str) -> Any:
    """The args of the other container in the sidecar's pod, parsed."""
    for documents in committed().values():
        for d in documents:
            pod = d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
            if sidecar in pod:
                other = next(c for c in pod if c["name"] == name)
                subst = [re.sub(r"\$\(([A-Z_]+)\)", lambda m: POD[m.group(1)], a) for a in other["args"]]
                return build_parser().parse_args(subst)
    raise AssertionError("no pod holds that container")


def test_a_runtime_without_its_own_sidecar_under_mtls_must_name_the_sidecars_certificates() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "controlplane.cli",
            "runtime",
            "examples.trivial.models:tokenize",
            "--model=m",
            "--version=v1",
            "--no-sidecar",
            "--security=mtls",
        ],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=60,
    )
    assert result.returncode == 1 and "--sidecar-tls-dir" in result.stderr and "Traceback" not in result.stderr


async def test_the_kubernetes_scaler_patches_the_scale_subresource_of_the_rendered_deployment() -> None:
    """The official client against a recorder of what an API server receives: PATCH of apps/v1
    deployments/NAME/scale, a merge patch of spec.replicas; the answer is a valid autoscaling/v1 Scale."""
    from kubernetes import client

    seen: list[tuple[str, str, str, Any]] = []

    async def scale(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append((request.method, request.path, request.content_type, body))
        answer = {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {"name": request.match_info["name"], "namespace": request.match_info["namespace"]},
            "spec": {"replicas": body["spec"]["replicas"]},
            "status": {"replicas": 1},
        }
        kubernetes_validate.validate(answer, KUBERNETES, strict=True)
        return web.json_response(answer)

    app = web.Application()
    app.router.add_route("*", "/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale", scale)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        config = client.Configuration(host=f"http://127.0.0.1:{port}")
        backend = KubernetesBackend("mllambda", client.AppsV1Api(client.ApiClient(config)))
        await backend.scale(Policy("classifier", "v1", 1, 3), 3)
    finally:
        await runner.cleanup()
    method, path, content_type, body = seen[0]
    assert method == "PATCH"
    assert path == "/apis/apps/v1/namespaces/mllambda/deployments/runtime-classifier-v1/scale"
    assert content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json")
    assert body == {"spec": {"replicas": 3}}
    names = {d["metadata"]["name"] for d in committed()["runtimes.yaml"]}
    assert "runtime-classifier-v1" in names  # the scaler names the Deployment the manifests create
    role = next(d for d in committed()["controlplane.yaml"] if d["kind"] == "Role")
    assert any("deployments/scale" in r["resources"] and "patch" in r["verbs"] for r in role["rules"])
    autoscaled = next(d for d in committed()["runtimes.yaml"] if d["metadata"]["name"] == "runtime-classifier-v1")
    assert "replicas" not in autoscaled["spec"]  # `kubectl apply` again leaves the scaler's count alone


def test_render_writes_the_files_and_a_bad_stack_file_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "k8s"
    ok = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "render", "kubernetes", "-f", str(STACK), "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=60,
    )
    assert ok.returncode == 0 and sorted(p.name for p in out.iterdir()) == sorted(FILES), ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Stack\nruntimes: [{model: m, version: v1, target: x:y, autoscale: {max_replicas: 0}}]\n")
    refused = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "render", "kubernetes", "-f", str(bad), "-o", str(tmp_path / "no")],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=60,
    )
    assert refused.returncode == 1 and "autoscale.max_replicas" in refused.stderr
    assert not (tmp_path / "no").exists()


class ApiServer:
    """What an API server receives for apps/v1 Deployments in one namespace, answering as one does: create (409
    if the name exists), strategic-merge patch, list by label selector, delete; `refuse` names ones it answers
    403 (RBAC)."""

    def __init__(self) -> None:
        self.deployments: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.refuse: set[str] = set()
        app = web.Application()
        base = "/apis/apps/v1/namespaces/{namespace}/deployments"
        app.router.add_post(base, self.create)
        app.router.add_get(base, self.list)
        app.router.add_patch(base + "/{name}", self.patch)
        app.router.add_delete(base + "/{name}", self.delete)
        self.runner = web.AppRunner(app)

    async def start(self) -> Any:
        from kubernetes import client

        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return client.AppsV1Api(client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{port}")))

    def answer(self, body: dict[str, Any], status: int = 200) -> web.Response:
        return web.json_response(body, status=status)

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        kubernetes_validate.validate(body, KUBERNETES, strict=True)
        name = body["metadata"]["name"]
        self.calls.append(("create", name))
        if name in self.refuse:
            return self.answer({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403}, 403)
        if name in self.deployments:
            return self.answer({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 409}, 409)
        self.deployments[name] = body
        return self.answer(body, 201)

    async def patch(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        assert request.content_type == "application/strategic-merge-patch+json", request.content_type
        body = await request.json()
        self.calls.append(("patch", name))
        merged = {**self.deployments[name], **body, "spec": {**self.deployments[name]["spec"], **body["spec"]}}
        kubernetes_validate.validate(merged, KUBERNETES, strict=True)
        self.deployments[name] = merged
        return self.answer(merged)

    async def list(self, request: web.Request) -> web.Response:
        key, _, value = request.query["labelSelector"].partition("=")
        self.calls.append(("list", request.query["labelSelector"]))
        items = [d for d in self.deployments.values() if d["metadata"].get("labels", {}).get(key) == value]
        return self.answer({"apiVersion": "apps/v1", "kind": "DeploymentList", "metadata": {}, "items": items})

    async def delete(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.calls.append(("delete", name))
        del self.deployments[name]
        return self.answer({"kind": "Status", "apiVersion": "v1", "status": "Success"})


async def test_deployed_versions_get_their_deployment_and_lose_it_when_undeployed_and_no_other_is_touched(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`mllambda deploy` on Kubernetes: the control plane makes each deployed version's Deployment (package fetched
    and its environment built by an init container), patches it when the deploy changes, and deletes only its own
    when undeployed; requests as the official client sends them, each manifest valid for the API."""
    from controlplane.models.store import Deployment
    from controlplane.scaling.deployer import LABEL, SYNC_EVERY, KubernetesDeployer
    from controlplane.stack.kubernetes import deployed_runtime

    server = ApiServer()
    api = await server.start()
    applied_by_hand = next(d for d in committed()["runtimes.yaml"] if d["metadata"]["name"] == "runtime-net-sports-v1")
    server.deployments["runtime-net-sports-v1"] = applied_by_hand  # from rendered manifests, a person's to remove
    deployer = KubernetesDeployer("mllambda", deployed_runtime, api)
    fixed = Deployment("classifier", "v2", "0" * 64, 2, 1.0, "ada")
    scaled = Deployment("features", "v1", "1" * 64, 1, 1.0, "ada", {"min_replicas": 1, "max_replicas": 3})
    try:
        await deployer.sync([fixed, scaled], now=100.0)
        made = server.deployments["runtime-classifier-v2"]
        assert made["spec"]["replicas"] == 2 and made["metadata"]["labels"][LABEL] == "deploy"
        pod = made["spec"]["template"]["spec"]
        assert pod["initContainers"][0]["args"][:2] == ["prepare", "classifier:v2"]  # the storage initializer
        runtime = next(c for c in pod["containers"] if c["name"] == "runtime")
        assert runtime["args"][:2] == ["runtime", "--package"] and "--model=classifier" in runtime["args"]
        autoscaled = server.deployments["runtime-features-v1"]
        assert "replicas" not in autoscaled["spec"]  # the scaler's count stands
        assert "--max-in-flight=8" in next(c for c in autoscaled["spec"]["template"]["spec"]["containers"])["args"]

        server.calls.clear()
        await deployer.sync([fixed, scaled], now=101.0)
        assert server.calls == []  # nothing changed, not due: no call

        bigger = Deployment("classifier", "v2", "0" * 64, 3, 2.0, "ada")
        await deployer.sync([bigger, scaled], now=102.0)
        assert server.calls == [("create", "runtime-classifier-v2"), ("patch", "runtime-classifier-v2")]
        assert server.deployments["runtime-classifier-v2"]["spec"]["replicas"] == 3

        server.calls.clear()
        await deployer.sync([bigger], now=103.0)  # features undeployed
        assert server.calls == [("list", f"{LABEL}=deploy"), ("delete", "runtime-features-v1")]
        assert set(server.deployments) == {"runtime-classifier-v2", "runtime-net-sports-v1"}  # a person's stays

        server.refuse.add("runtime-score-v1")  # RBAC says no: said once, tried again when due
        refused = Deployment("score", "v1", "2" * 64, 1, 3.0, "ada")
        await deployer.sync([bigger, refused], now=104.0)
        await deployer.sync([bigger, refused], now=105.0)
        assert [c for c in server.calls if c[1] == "runtime-score-v1"] == [("create", "runtime-score-v1")]
        assert caplog.text.count("deployment=runtime-score-v1 not applied") == 1, caplog.text
        server.refuse.clear()
        await deployer.sync([bigger, refused], now=104.0 + SYNC_EVERY)
        assert "runtime-score-v1" in server.deployments and not deployer.failed

        del server.deployments["runtime-classifier-v2"]  # deleted by hand: back at the next due sync
        await deployer.sync([bigger, refused], now=104.0 + 2 * SYNC_EVERY)
        assert server.deployments["runtime-classifier-v2"]["spec"]["replicas"] == 3
    finally:
        api.api_client.close()
        await server.runner.cleanup()
