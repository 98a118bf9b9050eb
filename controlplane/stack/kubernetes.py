"""Kubernetes manifests, rendered from a stack file: `mllambda render kubernetes -f STACK -o DIR`.

One place builds every command line the pods run, with the flags the CLI
defines (the tests parse each with the CLI's own parser), so the manifests in
deploy/kubernetes/ cannot drift from the code. Pure: a stack in, documents out.

Layout (kustomize): two control planes behind a headless Service (sidecars
resolve it with STRICT_DNS and fail over between them), one gateway Envoy, and
per model version a Deployment of two containers sharing a folder: the runtime
(`mllambda runtime --no-sidecar`) and its Envoy (`mllambda sidecar`), which
keeps the model's Connect certificate there. Consul comes from its official
Helm chart (client agents on every node; pods reach theirs at the node's IP).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from contract.naming import GATEWAY_IDENTITY, model_cluster
from controlplane.errors import CliError
from controlplane.models.store import Deployment
from controlplane.scaling.policy import InvalidPolicy, deployed_policy, policies_document
from controlplane.scaling.scaler import deployment_name
from controlplane.stack.file import RuntimeSpec, Stack, load_stack

IMAGE = "mllambda"  # kustomize's `images:` sets the registry and tag
RUN = "/var/run/mllambda"  # the folder a pod's containers share (sockets, Envoy bootstrap, certificates)
XDS = "controlplane:18000"
CONSUL = "$(HOST_IP):8500"  # the Consul client agent on the pod's node (Helm chart: client.enabled)
PORTS = {"runtime": 8080, "ingress": 15001, "egress": 15002, "envoy_admin": 19000, "packages": 18004}
MODELS = "/var/lib/mllambda"  # a runtime pod's packages and environments (its init container fills it)
STORE = "/var/lib/mllambda/store"  # the control planes' model store: one volume they all mount (ReadWriteMany)
FILES = ("kustomization.yaml", "controlplane.yaml", "gateway.yaml", "runtimes.yaml")
HEADER = (
    "# Rendered by `mllambda render kubernetes -f examples/nlp/stack.yaml -o deploy/kubernetes`: edit the stack file\n"
)


def _env(*names: str) -> list[dict[str, Any]]:
    """Downward API values the command lines use as $(NAME)."""
    paths = {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "POD_IP": "status.podIP",
        "HOST_IP": "status.hostIP",
    }
    return [{"name": n, "valueFrom": {"fieldRef": {"fieldPath": paths[n]}}} for n in names]


def _container(name: str, argv: list[str], env: list[dict[str, Any]], ports: dict[str, int]) -> dict[str, Any]:
    return {
        "name": name,
        "image": IMAGE,
        "command": ["mllambda"],
        "args": argv,
        "env": [*env, {"name": "MLLAMBDA_RUN_DIR", "value": RUN}],
        **({"ports": [{"name": n, "containerPort": p} for n, p in ports.items()]} if ports else {}),
        "volumeMounts": [{"name": "run", "mountPath": RUN}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "allowPrivilegeEscalation": False},
    }


def _deployment(name: str, replicas: int, containers: list[dict[str, Any]], account: str = "") -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "mllambda"}
    spec: dict[str, Any] = {"containers": containers, "volumes": [{"name": "run", "emptyDir": {}}]}
    if account:
        spec["serviceAccountName"] = account
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": spec},
        },
    }


def controlplane_args(autoscaled: bool) -> list[str]:
    return [
        "controlplane",
        "--xds=$(POD_IP):18000",
        "--admin=127.0.0.1:18001",
        f"--consul={CONSUL}",
        "--security=mtls",
        f"--gateway-tls-dir={RUN}/gateway-tls",
        "--gateway-host=0.0.0.0",
        "--gateway-port=18080",
        "--metrics-port=18002",
        f"--packages=$(POD_IP):{PORTS['packages']}",
        f"--model-store={STORE}",
        "--scaler=kubernetes",  # scaling, and a Deployment per `mllambda deploy` (scaling/deployer.py)
        "--kubernetes-namespace=$(POD_NAMESPACE)",
        *(["--autoscale=/etc/mllambda/autoscale.yaml"] if autoscaled else []),
    ]


def gateway_args() -> list[str]:
    return [
        "sidecar",
        "--node-id=gateway",
        "--cluster=gateway",
        f"--xds={XDS}",
        "--admin-port=19000",
        f"--config-dir={RUN}",
        "--security=mtls",
        f"--identity={GATEWAY_IDENTITY}",
        f"--consul={CONSUL}",
    ]


def package_flags() -> list[str]:
    """Where a runtime pod keeps its package: the volume its init container (`mllambda prepare`) filled."""
    return [f"--model-store={MODELS}/store", f"--packages-from=controlplane:{PORTS['packages']}"]


def prepare_args(spec: RuntimeSpec) -> list[str]:
    return [
        "prepare",
        f"{spec.model}:{spec.version}",
        f"--consul={CONSUL}",
        "--security=mtls",
        *package_flags(),
    ]


def runtime_args(spec: RuntimeSpec) -> list[str]:
    code = ["--package", *package_flags()] if spec.from_store else [spec.target]
    return [
        "runtime",
        *code,
        f"--model={spec.model}",
        f"--version={spec.version}",
        "--service-id=$(POD_NAME)",
        f"--consul={CONSUL}",
        f"--xds={XDS}",
        "--security=mtls",
        "--no-sidecar",
        f"--sidecar-tls-dir={RUN}/$(POD_NAME)-tls",
        "--advertise-address=$(POD_IP)",
        f"--port={PORTS['runtime']}",
        f"--ingress-port={PORTS['ingress']}",
        f"--egress-port={PORTS['egress']}",
        f"--envoy-admin-port={PORTS['envoy_admin']}",
        *([f"--loader={spec.loader}"] if spec.loader else []),
        *spec.runtime_args(),
    ]


def sidecar_args(spec: RuntimeSpec) -> list[str]:
    return [
        "sidecar",
        "--node-id=$(POD_NAME)",
        f"--cluster={model_cluster(spec.model, spec.version)}",
        f"--xds={XDS}",
        f"--admin-port={PORTS['envoy_admin']}",
        f"--config-dir={RUN}",
        "--security=mtls",
        f"--identity={spec.model}",
        f"--consul={CONSUL}",
    ]


def runtime_deployment(spec: RuntimeSpec) -> dict[str, Any]:
    """The runtime and its Envoy. The Envoy stops last: its preStop waits while the runtime deregisters
    and drains (SIGTERM reaches both containers at once)."""
    sidecar = _container("envoy", sidecar_args(spec), _env("POD_NAME", "HOST_IP"), {"ingress": PORTS["ingress"]})
    sidecar["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", "5"]}}}
    runtime = _container("runtime", runtime_args(spec), _env("POD_NAME", "POD_IP", "HOST_IP"), {})
    deployment = _deployment(deployment_name(spec.model, spec.version), spec.replicas, [runtime, sidecar])
    if spec.from_store:  # the storage-initializer pattern: the package and its environment, before the runtime starts
        prepare = _container("package", prepare_args(spec), _env("HOST_IP"), {})
        pod = deployment["spec"]["template"]["spec"]
        pod["initContainers"] = [prepare]
        pod["volumes"].append({"name": "models", "emptyDir": {}})
        for container in (prepare, runtime):
            container["env"].append({"name": "MLLAMBDA_CACHE_DIR", "value": f"{MODELS}/cache"})
            container["volumeMounts"].append({"name": "models", "mountPath": MODELS})
    if spec.autoscale:  # the scaler owns the count: a later `kubectl apply` must not reset it
        del deployment["spec"]["replicas"]
    return deployment


def deployed_runtime(record: Deployment) -> dict[str, Any]:
    """The Deployment of a version deployed with `mllambda deploy`, run from its package as a stack file's packaged
    runtime is (the control plane applies it with `--scaler kubernetes`: scaling/deployer.py). A policy that does
    not read leaves its count fixed, as on the local stack."""
    try:
        policy = deployed_policy(record.model, record.version, record.autoscale) if record.autoscale else None
    except InvalidPolicy:
        policy = None
    return runtime_deployment(RuntimeSpec(record.model, record.version, "", replicas=record.replicas, autoscale=policy))


def _service(name: str, ports: dict[str, int], headless: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selector": {"app.kubernetes.io/name": name},
        "ports": [{"name": n, "port": p, "targetPort": p} for n, p in ports.items()],
    }
    if headless:  # every control plane's address in DNS: sidecars connect to each (STRICT_DNS)
        spec |= {"clusterIP": "None", "publishNotReadyAddresses": False}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}


def scaler_rbac() -> list[dict[str, Any]]:
    """What the kubernetes scaler needs, no more: Deployments of deployed versions, the scale subresource."""
    rules = [
        # `mllambda deploy`: the Deployments of deployed versions are made, patched and removed (scaling/deployer.py)
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list", "create", "patch", "delete"]},
        {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "patch", "update"]},
    ]
    subject = {"kind": "ServiceAccount", "name": "controlplane"}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "controlplane"}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "mllambda-scaler"},
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "mllambda-scaler"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "mllambda-scaler"},
            "subjects": [subject],
        },
    ]


def render(stack: Stack) -> dict[str, list[dict[str, Any]]]:
    """File name -> its documents."""
    policies = stack.policies
    plane = _container(
        "controlplane",
        controlplane_args(bool(policies)),
        _env("POD_IP", "POD_NAMESPACE", "HOST_IP"),
        {"xds": 18000, "packages": PORTS["packages"]},
    )
    control: list[dict[str, Any]] = scaler_rbac()
    deployment = _deployment("controlplane", 2, [plane], account="controlplane")
    if policies:
        plane["volumeMounts"].append({"name": "autoscale", "mountPath": "/etc/mllambda", "readOnly": True})
        deployment["spec"]["template"]["spec"]["volumes"].append(
            {"name": "autoscale", "configMap": {"name": "autoscale"}}
        )
        document = yaml.safe_dump(policies_document(policies), sort_keys=False)
        control.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "autoscale"},
                "data": {"autoscale.yaml": document},
            }
        )
    if any(spec.package for spec in stack.runtimes):  # the store, shared by every control plane
        plane["volumeMounts"].append({"name": "model-store", "mountPath": STORE})
        deployment["spec"]["template"]["spec"]["volumes"].append(
            {"name": "model-store", "persistentVolumeClaim": {"claimName": "model-store"}}
        )
        claim = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "20Gi"}}}
        control.append(
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "model-store"}, "spec": claim}
        )
    ports = {"xds": 18000, "packages": PORTS["packages"]}
    control += [deployment, _service("controlplane", ports, headless=True)]
    gateway = _container("envoy", gateway_args(), _env("HOST_IP"), {"http": 18080})
    edge = [_deployment("gateway", 1, [gateway]), _service("gateway", {"http": 18080})]
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "mllambda",
        "resources": list(FILES[1:]),
        "images": [{"name": IMAGE, "newName": IMAGE, "newTag": "0.1.0"}],
    }
    runtimes = [runtime_deployment(spec) for spec in stack.runtimes]
    return {FILES[0]: [kustomization], FILES[1]: control, FILES[2]: edge, FILES[3]: runtimes}


class _Plain(yaml.SafeDumper):
    """No anchors and aliases: the same labels written out where each is used."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def as_text(documents: list[dict[str, Any]]) -> str:
    return HEADER + "---\n".join(yaml.dump(d, Dumper=_Plain, sort_keys=False) for d in documents)


def cmd_render(args: argparse.Namespace) -> int:
    stack = load_stack(Path(args.filename))
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, documents in render(stack).items():
            (out / name).write_text(as_text(documents))
    except OSError as err:
        raise CliError(f"cannot write to {out}: {err.strerror}") from err
    print(f"wrote {', '.join(FILES)} to {out} (kubectl apply -k {out})")
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("render", help="render deployment manifests from a stack file")
    parser.add_argument("target", choices=["kubernetes"])
    parser.add_argument("-f", "--filename", required=True, help="stack file (kind: Stack)")
    parser.add_argument("-o", "--output-dir", required=True, help="folder for the kustomize manifests")
    parser.set_defaults(handler=cmd_render)
