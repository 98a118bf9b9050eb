"""One virtual environment per lock, built by uv and shared by every package version with the same lock.

An environment holds the package's locked requirements, the runtime SDK's own
dependencies pinned to the versions of this ML Lambda, and a copy of `runtime_sdk`
and `contract` from this ML Lambda (so its folder is named by the lock and by a hash
of that SDK: `<lock hash>-<sdk id>`): what `python -m runtime_sdk.child` needs, and
nothing of the control plane's. It is built in a folder of its own and renamed into
place only when complete, so a crash or a failed install never leaves a half
environment that looks ready; uv's output is kept beside it (`<hash>.log`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import contract
import runtime_sdk
from controlplane.models.package import (
    PackageError,
    PackageMeta,
    lock_hash,
    python_version,
    read_lock,
    read_meta,
    unpack,
)

# What runtime_sdk and contract import, pinned to this environment's versions (so the SDK behaves the same).
SDK_REQUIREMENTS = ("py-consul", "aiohttp", "aiokafka", "prometheus-client", "orjson", "httptools")
BUILD_TIMEOUT = 900.0


def find_uv() -> str:
    beside = Path(sys.executable).with_name("uv")
    found = str(beside) if beside.exists() else shutil.which("uv")
    if not found:
        raise PackageError("uv not found: run ./dev bootstrap (it installs the `uv` package)")
    return found


def sdk_pins() -> list[str]:
    pins = []
    for name in SDK_REQUIREMENTS:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(name)
    return pins


@functools.cache
def sdk_id() -> str:
    """What this ML Lambda puts into every environment (its SDK's files and pins), hashed: an environment
    is reused only by the same lock *and* the same SDK, so an upgraded ML Lambda never runs an old copy."""
    digest = hashlib.sha256("\n".join(sdk_pins()).encode())
    for package in (runtime_sdk, contract):
        root = Path(package.__file__ or "").parent
        for path in sorted(root.rglob("*.py")):
            digest.update(path.relative_to(root.parent).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


OPTIONAL_NOTE = "(optional: without it the runtime serves unprofiled, /profiles says why)"


def _optional(install: list[str], requirement: str, log: Any) -> None:
    """Install `requirement` unpinned beside the lock (it resolves against the model's own pins); a failure
    is logged, not fatal."""
    for attempt in ([*install, requirement, "--offline"], [*install, requirement]):
        log.write("$ " + " ".join(attempt) + f"  {OPTIONAL_NOTE}\n")
        log.flush()
        if subprocess.run(attempt, stdout=log, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT).returncode == 0:
            return


def env_python(env: Path) -> Path:
    return env / "bin" / "python"


def env_folder(envs_dir: Path, lock_id: str) -> Path:
    """Where the environment of a lock lives on this host, for this SDK (built or not)."""
    return envs_dir / f"{lock_id}-{sdk_id()}"


def ensure_env(envs_dir: Path, lock_text: str, lock_id: str, python: str) -> Path:
    """The environment of a lock: reused when present, else built (seconds with uv's cache)."""
    if python != python_version():
        raise PackageError(
            f"the package was locked for Python {python}; this host runs Python {python_version()}: build it again here"
        )
    target = env_folder(envs_dir, lock_id)
    if env_python(target).exists():
        return target
    envs_dir.mkdir(parents=True, exist_ok=True)
    partial = envs_dir / f".{lock_id}.{os.getpid()}.{int(time.time())}"
    log_path = envs_dir / f"{target.name}.log"
    uv = find_uv()
    lock_file = partial.with_suffix(".lock.txt")
    lock_file.write_text(lock_text)
    # Bytecode compiled once here, for every replica that starts from this environment: without it each
    # start compiles scikit-learn and friends again where writing __pycache__ is off (3.5 s -> 1.3 s here).
    install = [uv, "pip", "install", "--quiet", "--compile-bytecode", "--python", str(env_python(partial))]
    steps = [[uv, "venv", "--quiet", "--python", sys.executable, str(partial)], [*install, *sdk_pins()]]
    if lock_text.strip():
        steps.append([*install, "--require-hashes", "-r", str(lock_file)])
    try:
        with log_path.open("w") as log:
            for argv in steps:
                # uv's cache first (seconds, and no index needed: a host without one builds what it has seen),
                # then the index for what the cache lacks.
                for attempt in ([*argv, "--offline"], argv):
                    log.write("$ " + " ".join(attempt) + "\n")
                    log.flush()
                    done = subprocess.run(attempt, stdout=log, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT)
                    if done.returncode == 0:
                        break
                if done.returncode != 0:
                    raise PackageError(f"building the environment failed:\n{_tail(log_path)}\n(full log: {log_path})")
            _optional(install, "datasketches", log)  # the runtime's profiles; the model's numpy decides
        site = _site_packages(partial)
        for package in (runtime_sdk, contract):
            source = Path(package.__file__ or "").parent
            shutil.copytree(source, site / source.name, ignore=shutil.ignore_patterns("__pycache__"))
        try:
            partial.rename(target)
        except OSError:  # built by someone else meanwhile: theirs is as good
            shutil.rmtree(partial, ignore_errors=True)
        prune(envs_dir, lock_id, target)
    finally:
        lock_file.unlink(missing_ok=True)
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return target


KEEP_OLDER = 1  # environments of the same lock for an older SDK kept beside the new one (a rollback's)


def prune(envs_dir: Path, lock_id: str, current: Path) -> list[Path]:
    """The environments of `lock_id` built for older SDKs, beyond the newest KEEP_OLDER, removed unless a running
    process uses them: each ML Lambda upgrade builds new ones, and the old ones would pile up (~300 MB each).
    (`<lock hash>` alone is how environments were named before the SDK's hash was part of it.)"""
    older = sorted(
        (p for p in [*envs_dir.glob(f"{lock_id}-*"), envs_dir / lock_id] if p.is_dir() and p != current),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    removed = []
    for env in older[KEEP_OLDER:]:
        if not in_use(env):
            shutil.rmtree(env, ignore_errors=True)
            (envs_dir / f"{env.name}.log").unlink(missing_ok=True)
            removed.append(env)
    return removed


def in_use(folder: Path) -> bool:
    """Does a running process run from `folder`: a word of its command line inside it (its executable), or its
    working folder (a package's runtime runs in the package's folder)?"""
    prefix = str(folder) + os.sep
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            words = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(proc / "cwd") + os.sep
        except OSError:
            continue
        if cwd.startswith(prefix) or any(word.decode(errors="replace").startswith(prefix) for word in words):
            return True
    return False


def prune_host(cache: Path, digests: set[str], locks: set[str]) -> list[Path]:
    """This host's unpacked packages whose digest no stored version has, and environments of locks no stored
    version uses, removed unless a running process uses them: deleted versions leave nothing behind (an
    environment is ~300 MB). Folders being made (their names start with a dot) are left alone."""
    removed = []
    for kind, keep in (("packages", digests), ("envs", locks)):
        folder = cache / kind
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            name = path.name.split("-", 1)[0] if kind == "envs" else path.name
            if path.name.startswith(".") or not path.is_dir() or name in keep or in_use(path):
                continue
            shutil.rmtree(path, ignore_errors=True)
            (folder / f"{path.name}.log").unlink(missing_ok=True)
            removed.append(path)
    return removed


def _site_packages(env: Path) -> Path:
    found = sorted((env / "lib").glob("python*/site-packages"))
    if not found:
        raise PackageError(f"{env}: no site-packages after uv venv")
    return found[0]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def check_entry(env: Path, package_dir: Path, targets: list[str]) -> None:
    """Import the entry (and loader) in the package's environment, as the runtime will: a typo fails the build."""
    code = (
        "import importlib, sys\n"
        "for target in sys.argv[1:]:\n"
        "    module, _, attr = target.partition(':')\n"
        "    if not callable(getattr(importlib.import_module(module), attr, None)):\n"
        "        sys.exit(f'{target}: {module} has no callable {attr}')\n"
    )
    done = subprocess.run(
        [str(env_python(env)), "-c", code, *targets], cwd=package_dir, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PackageError(f"entry: {' / '.join(targets)} does not import in the package's environment: {last}")


def read_signature(env: Path, package_dir: Path, meta: PackageMeta) -> dict[str, Any]:
    """A saved model opened by its own library in its environment: its signature, or why it does not load."""
    done = subprocess.run(
        [str(env_python(env)), "-m", "runtime_sdk.formats", "describe", meta.format, meta.model_file],
        cwd=package_dir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PackageError(f"{meta.model_file}: the {meta.format} model does not load in its environment: {last}")
    try:
        signature = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as err:
        raise PackageError(f"{meta.model_file}: no signature from the {meta.format} runtime") from err
    return dict(signature)


def infer_contract(env: Path, package_dir: Path, meta: PackageMeta) -> dict[str, Any]:
    """A contract inferred from the package's examples through its predict, in its environment ({}: not told:
    an example failed or is no object; `mllambda test` says why). runtime_sdk/examples.py says how."""
    loader = ["--loader", meta.loader] if meta.loader else []
    done = subprocess.run(
        [str(env_python(env)), "-m", "runtime_sdk.examples", "--infer", meta.examples, "--entry", meta.entry, *loader],
        cwd=package_dir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        found = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
    except (ValueError, IndexError):
        found = {}
    return dict(found) if isinstance(found, dict) else {}


def prepare(archive: bytes, digest: str, cache: Path) -> tuple[Path, Path, PackageMeta]:
    """A stored package made runnable on this host: unpacked by digest, its environment built or reused."""
    folder = unpack(archive, digest, cache / "packages")
    meta = read_meta(archive)
    lock_text = read_lock(archive)
    env = ensure_env(cache / "envs", lock_text, lock_hash(lock_text, meta.python), meta.python)
    return folder, env, meta
