"""The stack file (`kind: Stack`): parsed and checked, every problem named with where it is."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from contract.naming import LABEL, VERSION, name_problem
from controlplane.errors import CliError
from controlplane.models.formats import FormatError, detect
from controlplane.pipeline.model import InvalidPipeline, Pipeline
from controlplane.pipeline.spec import parse_pipeline
from controlplane.scaling.policy import InvalidPolicy, Policy, parse_policy


@dataclass(frozen=True)
class Ports:
    consul: int = 8500
    xds: int = 18000
    admin: int = 18001
    gateway: int = 18080
    gateway_admin: int = 19000
    controlplane_metrics: int = 18002
    kafka: int = 9092
    bridge: int = 18003  # the control plane's Kafka HTTP bridge (with kafka: true)


@dataclass(frozen=True)
class RuntimeSpec:
    model: str
    version: str
    target: str
    loader: str | None = None
    replicas: int = 1
    args: tuple[str, ...] = ()  # extra `mllambda runtime` flags, e.g. ["--inline"]
    autoscale: Policy | None = None  # replicas follow load between its bounds (`replicas` is where they start)
    package: str = ""  # a model package's folder (absolute): built, stored and run in its own environment
    manifest: str = "mllambda.yaml"  # the package's manifest, a file in that folder

    @property
    def from_store(self) -> bool:
        """Run from its package in the model store (named by a package folder, or deployed), not an import path."""
        return bool(self.package) or not self.target

    def runtime_args(self) -> tuple[str, ...]:
        """Its flags, with admission derived from its autoscale policy unless they set it: places in predict for
        twice the target in flight (the scaler adds replicas at the target), and a long queue (1,024 places, 30 s,
        less where the route's timeout ends a wait first) in which priorities and fair shares order who goes
        next, so a load step is served late rather than refused while replicas start (runtime_sdk/admission.py)."""
        if self.autoscale is None or any(a.startswith("--max-in-flight") for a in self.args):
            return self.args
        target = math.ceil(self.autoscale.target_in_flight)
        return (f"--max-in-flight={2 * target}", "--queue=1024", "--queue-wait=30", *self.args)


@dataclass(frozen=True)
class Stack:
    name: str
    ports: Ports
    runtimes: tuple[RuntimeSpec, ...]
    pipelines: tuple[Pipeline, ...]
    kafka: bool = False  # start a tansu broker, so pipelines can use transport: kafka
    gateway_concurrency: int | None = None  # gateway Envoy worker threads (default: one per core)
    security: str = "mtls"  # every hop mutually authenticated; "plaintext" turns it off (benchmarks compare)

    @property
    def policies(self) -> tuple[Policy, ...]:
        """The autoscaling policies of its runtimes."""
        return tuple(r.autoscale for r in self.runtimes if r.autoscale is not None)


def load_stack(path: Path) -> Stack:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise CliError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict) or data.get("kind") != "Stack":
        raise CliError(f"{path}: expected a document with `kind: Stack` (pipelines go to `mllambda apply`)")
    problems = unknown_keys(data, STACK_KEYS, "")
    port_names = [f.name for f in fields(Ports)]
    raw_ports = data.get("ports") or {}
    if not isinstance(raw_ports, dict):
        problems.append(f"ports: expected a mapping of {', '.join(port_names)}")
        raw_ports = {}
    problems += unknown_keys(raw_ports, port_names, "ports.")
    chosen = {k: v for k, v in raw_ports.items() if k in port_names}
    ports = Ports(**{k: whole_number(v, f"ports.{k}", problems, 1, 65535) for k, v in chosen.items()})
    runtimes = []
    for i, raw in enumerate(listed(data, "runtimes", problems)):
        where = f"runtimes[{i}]"
        if not isinstance(raw, dict):
            problems.append(f"{where}: expected a mapping with model, version, target")
            continue
        problems += unknown_keys(raw, RUNTIME_KEYS, f"{where}.")
        package, manifest = runtime_code(raw, where, path.parent, problems)
        needed = ("model", "version") if "package" in raw else ("model", "version", "target")
        missing = [k for k in needed if not isinstance(raw.get(k), str) or not raw[k]]
        if missing:
            problems.append(f"{where}: missing {', '.join(missing)} (strings)")
        for key, rule in (("model", LABEL), ("version", VERSION)):
            if key not in missing and (problem := name_problem(raw[key], rule)):
                problems.append(f"{where}.{key}: {problem}")
        args = raw.get("args") or []
        if not isinstance(args, list):
            problems.append(f"{where}.args: expected a list of flags, e.g. [--inline=never]")
            args = []
        policy = None
        if "autoscale" in raw and not missing:
            policy = autoscale_policy(raw, where, problems)
        start = policy.min_replicas if policy else 1
        replicas = whole_number(raw.get("replicas", start), f"{where}.replicas", problems, min(start, 1), 100)
        if policy and not policy.min_replicas <= replicas <= policy.max_replicas:
            problems.append(
                f"{where}.replicas: {replicas} is outside autoscale's {policy.min_replicas}..{policy.max_replicas}"
            )
        if not missing:
            loader = raw.get("loader")
            args_ = tuple(str(a) for a in args)
            spec = RuntimeSpec(raw["model"], raw["version"], raw.get("target") or "", loader, replicas, args_, policy)
            runtimes.append(replace(spec, package=package, manifest=manifest))
    pipelines = []
    for i, raw in enumerate(listed(data, "pipelines", problems)):
        try:
            pipelines.append(parse_pipeline(raw))
        except InvalidPipeline as err:
            problems += [f"pipelines[{i}].{p}" for p in err.problems]
    concurrency = data.get("gateway_concurrency")
    if concurrency is not None:
        concurrency = whole_number(concurrency, "gateway_concurrency", problems, 1, 256)
    kafka = data.get("kafka", False)
    if not isinstance(kafka, bool):
        problems.append(f"kafka: expected true or false, got {kafka!r}")
    security = data.get("security", "mtls")
    if security not in ("mtls", "plaintext"):
        problems.append(f"security: expected mtls or plaintext, got {str(security)[:40]!r}")
    name = data.get("name", "stack")
    if problem := name_problem(name, LABEL):
        problems.append(f"name: {problem}")
    if problems:
        raise CliError(f"{path} has problems:\n  " + "\n  ".join(problems))
    return Stack(str(name), ports, tuple(runtimes), tuple(pipelines), kafka, concurrency, str(security))


STACK_KEYS = ("kind", "name", "ports", "runtimes", "pipelines", "kafka", "gateway_concurrency", "security")
RUNTIME_KEYS = ("model", "version", "target", "loader", "replicas", "args", "autoscale", "package", "manifest")


def runtime_code(raw: dict[str, Any], where: str, base: Path, problems: list[str]) -> tuple[str, str]:
    """A runtime's code: `target` (MODULE:CALLABLE in this environment) or `package` (a folder, relative to the
    stack file, with a manifest): (the package's absolute folder or "", the manifest's name)."""
    package, manifest = raw.get("package"), raw.get("manifest", "mllambda.yaml")
    if package is None:
        if "manifest" in raw:
            problems.append(f"{where}.manifest: only with package")
        return "", "mllambda.yaml"
    if "target" in raw or "loader" in raw:
        problems.append(f"{where}: package or target (with loader), not both: a package's manifest names its entry")
    if not isinstance(package, str) or not (base / package).is_dir():
        problems.append(f"{where}.package: {str(package)[:80]!r} is not a folder (relative to the stack file)")
        return "", "mllambda.yaml"
    folder = (base / package).resolve()
    inside = isinstance(manifest, str) and (folder / manifest).resolve().is_relative_to(folder)
    if "manifest" not in raw and not (folder / manifest).exists() and saved_model(folder):
        return str(folder), manifest  # a model saved by its library: no manifest needed
    if not isinstance(manifest, str) or not inside or not (folder / manifest).is_file():
        problems.append(f"{where}.manifest: {str(manifest)[:80]!r} is not a file in {package}")
        return "", "mllambda.yaml"
    return str(folder), manifest


def saved_model(folder: Path) -> bool:
    """Does the folder hold a model saved by its library (an MLflow model, an ONNX graph, a pickle...)?"""
    try:
        return detect(folder, sorted(p.name for p in folder.iterdir() if p.is_file())) is not None
    except FormatError:
        return True  # several model files: `build` names them
    except OSError:
        return False


def autoscale_policy(raw: dict[str, Any], where: str, problems: list[str]) -> Policy | None:
    """`autoscale:` of a runtime: a policy for its model version (which it names already)."""
    given = raw["autoscale"]
    if not isinstance(given, dict):
        problems.append(f"{where}.autoscale: expected a mapping (min_replicas, max_replicas, target_in_flight, ...)")
        return None
    bad = [k for k in ("model", "version") if k in given]
    problems += [f"{where}.autoscale.{k}: not here (the runtime names it)" for k in bad]
    try:
        return parse_policy({**given, "model": raw["model"], "version": raw["version"]}, f"{where}.autoscale.")
    except InvalidPolicy as err:
        problems += err.problems
        return None


def unknown_keys(data: dict[str, Any], known: Sequence[str], where: str) -> list[str]:
    return [f"{where}{k}: unknown field (known: {', '.join(known)})" for k in data if k not in known]


def listed(data: dict[str, Any], key: str, problems: list[str]) -> list[Any]:
    """`data[key]` if it is a list (absent: empty); else a problem is noted."""
    value = data.get(key) or []
    if not isinstance(value, list):
        problems.append(f"{key}: expected a list")
        return []
    return value


def whole_number(value: Any, where: str, problems: list[str], low: int, high: int) -> int:
    """`value` if it is an integer in [low, high]; else a problem is noted (and `low` stands in)."""
    if type(value) is not int or not low <= value <= high:
        problems.append(f"{where}: expected a whole number from {low} to {high}, got {value!r}")
        return low
    return value
