"""A model package: the model's code, its files and its locked requirements, as one content-addressed archive.

`mllambda build DIR --model M` reads DIR's manifest (`mllambda.yaml`, `kind: Model`),
locks its requirements with uv for the runtime's Python, and packs everything into a
tar whose bytes depend on content only (sorted names, no times, no owners). Its sha256
is the package's digest: the same content always gives the same digest, so a version
name can be held to one content (the store refuses a second one).

Inside the archive, `.mllambda/package.json` says how to run it (entry, loader, Python)
and `.mllambda/lock.txt` pins every dependency with hashes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controlplane.models.contract import example_problems, read_contract
from controlplane.models.formats import ENTRY, LOADER, Detected, FormatError, detect, mlflow_requirements
from controlplane.models.reference import MAX_BYTES, read_records

MANIFEST = "mllambda.yaml"
META = ".mllambda/package.json"
LOCK = ".mllambda/lock.txt"
MAX_PACKAGE = 512 * 1024 * 1024  # bytes of the archive: a large model's weights; bigger belongs in a model registry
MAX_FILES = 10_000
MANIFEST_KEYS = {
    *("kind", "entry", "loader", "requirements", "examples", "reference", "description", "format", "contract")
}
SKIPPED = {"__pycache__", ".git", ".venv", ".mllambda", ".ipynb_checkpoints"}
TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class PackageError(Exception):
    """The package cannot be built or read; the message names the file, field or dependency."""


@dataclass(frozen=True)
class PackageMeta:
    """What a package says about itself (`.mllambda/package.json`)."""

    entry: str  # MODULE:CALLABLE, importable from the package's root
    loader: str = ""  # MODULE:CALLABLE run once before the runtime turns ready
    python: str = ""  # MAJOR.MINOR the lock was made for
    requirements: tuple[str, ...] = ()  # what the author asked for, as written
    examples: str = ""  # a JSON-lines file of example requests, if any
    reference: str = ""  # a JSON-lines sample of what the model was trained on: a drift baseline (reference.py)
    description: str = ""
    files: tuple[str, ...] = field(default_factory=tuple)  # the model's own files (code, weights)
    format: str = ""  # a saved model served by runtime_sdk.formats (mlflow, onnx, sklearn, xgboost, lightgbm)
    model_file: str = ""  # that model's file ("." for an MLflow model: the folder)
    signature: dict[str, Any] = field(default_factory=dict)  # its inputs and outputs, as the library describes them

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode()

    @staticmethod
    def from_json(raw: bytes) -> PackageMeta:
        data = json.loads(raw)
        return PackageMeta(
            entry=str(data["entry"]),
            loader=str(data.get("loader", "")),
            python=str(data.get("python", "")),
            requirements=tuple(str(r) for r in data.get("requirements", ())),
            examples=str(data.get("examples", "")),
            reference=str(data.get("reference", "")),
            description=str(data.get("description", "")),
            files=tuple(str(f) for f in data.get("files", ())),
            format=str(data.get("format", "")),
            model_file=str(data.get("model_file", "")),
            signature=dict(data.get("signature") or {}),
        )


@dataclass(frozen=True)
class Built:
    """A packed model: its archive (bytes), digest, metadata and lock."""

    archive: bytes
    digest: str  # sha256 hex of `archive`
    meta: PackageMeta
    lock: str

    @property
    def lock_hash(self) -> str:
        return lock_hash(self.lock, self.meta.python)


def lock_hash(lock: str, python: str) -> str:
    """Environments are shared by identical locks for the same Python."""
    return hashlib.sha256(f"python {python}\n{lock}".encode()).hexdigest()


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def read_manifest(root: Path, manifest: str = MANIFEST, wanted_format: str = "") -> tuple[PackageMeta, list[str]]:
    """The manifest checked, every problem at once (as `field: message`); the requirement lines it names.

    A folder whose manifest names no entry (or that has no manifest) may hold a model saved by its
    library: then the format's runtime is the entry (controlplane/models/formats.py).
    """
    path = root / manifest
    if not root.is_dir():
        raise PackageError(f"{root}: not a directory")
    data = _manifest_data(path)
    detected: Detected | None = None
    if not data.get("entry"):
        try:
            detected = detect(root, package_files(root), wanted_format or str(data.get("format") or ""))
        except FormatError as err:
            raise PackageError(str(err)) from err
        if detected is None and not path.exists():
            raise PackageError(
                f"{path}: missing; a model package needs a manifest with `kind: Model` and `entry`, "
                "or a model file saved by its library (MLmodel, .onnx, .joblib/.pkl, XGBoost .json/.ubj, LightGBM .txt)"
            )
    problems = [
        f"{key}: unknown field (known: {', '.join(sorted(MANIFEST_KEYS))})" for key in data if key not in MANIFEST_KEYS
    ]
    if path.exists() and data.get("kind") != "Model":
        problems.append("kind: must be Model")
    entry = data.get("entry") or (ENTRY if detected else None)
    loader = data.get("loader") or (LOADER if detected else "")
    if not isinstance(entry, str) or not TARGET.match(entry):
        problems.append("entry: required, MODULE:CALLABLE (e.g. model:predict), importable from the package's root")
    if not isinstance(loader, str) or (loader and not TARGET.match(loader)):
        problems.append("loader: MODULE:CALLABLE")
    requirements: list[str] = list(detected.requirements) if detected else []
    req_name = data.get("requirements", "requirements.txt" if (root / "requirements.txt").exists() else "")
    if not isinstance(req_name, str):
        problems.append("requirements: a file name (requirements.txt)")
    elif req_name:
        try:
            requirements = requirement_lines((root / req_name).read_text())
        except (OSError, UnicodeDecodeError) as err:
            problems.append(f"requirements: cannot read {req_name}: {err}")
    if detected and detected.format == "mlflow":
        requirements = mlflow_requirements(requirements)
        if not requirements:
            problems.append("requirements: the MLflow model has no requirements.txt (save_model writes one)")
    examples = data.get("examples", "")
    if not isinstance(examples, str) or (examples and not _inside(root, examples)):
        problems.append(f"examples: {examples!r} is not a file of the package")
    reference = data.get("reference", "")
    if not isinstance(reference, str) or (reference and not _inside(root, reference)):
        problems.append(f"reference: {reference!r} is not a file of the package")
    elif reference:
        problems += reference_problems(root / reference)
    description = data.get("description", "")
    if not isinstance(description, str) or len(description) > 500:
        problems.append("description: text of up to 500 characters")
    declared = read_contract(data.get("contract"), problems)
    if declared and examples and not problems:
        problems += example_problems(root / examples, declared)
    if problems:
        raise PackageError(f"{path}:\n  " + "\n  ".join(problems))
    meta = PackageMeta(
        entry=str(entry),
        loader=str(loader),
        python=python_version(),
        requirements=tuple(requirements),
        examples=str(examples),
        reference=str(reference),
        description=str(description),
        format=detected.format if detected else "",
        model_file=detected.model_file if detected else "",
        signature=declared,
    )
    return meta, requirements


def _inside(root: Path, name: str) -> bool:
    """`name` is a file of the package (not outside it, so it is packed)."""
    path = Path(name)
    return not path.is_absolute() and ".." not in path.parts and (root / path).is_file()


def reference_problems(path: Path) -> list[str]:
    if path.stat().st_size > MAX_BYTES:
        return [f"reference: {path.stat().st_size:,} bytes, over {MAX_BYTES:,}: sample it"]
    return read_records(path.read_text(encoding="utf-8", errors="replace"))[1]


def _manifest_data(path: Path) -> dict[str, Any]:
    """The manifest's mapping ({} when the folder has none)."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise PackageError(f"{path}: cannot be read: {err}") from err
    if not isinstance(data, dict):
        raise PackageError(f"{path}: expected a mapping with kind: Model and entry: MODULE:CALLABLE")
    return data


def requirement_lines(text: str) -> list[str]:
    """Requirement lines without comments or blanks. Options that reach outside the package are refused."""
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-e", "--editable", "-r", "-c", "--requirement", "--constraint", "file:", "/", ".")):
            raise PackageError(f"requirements line {number}: {line!r}: only packages from an index (name and version)")
        lines.append(line)
    return lines


def package_files(root: Path) -> list[str]:
    """The model's own files, relative to its root, sorted; caches and virtualenvs are left out."""
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in SKIPPED for part in rel.parts) or path.suffix == ".pyc":
            continue
        if path.is_symlink():
            raise PackageError(f"{rel}: a symlink; a package holds plain files only")
        if path.is_file():
            found.append(rel.as_posix())
    if len(found) > MAX_FILES:
        raise PackageError(f"{root}: {len(found)} files, over the {MAX_FILES} a package may hold")
    return found


def lock(requirements: list[str], uv: str, python: str) -> str:
    """Pinned requirements with hashes, resolved by uv for `python`; uv's own message when it cannot."""
    if not requirements:
        return ""
    done = subprocess.run(
        [
            uv,
            "pip",
            "compile",
            "-",
            "--python-version",
            python,
            "--generate-hashes",
            "--no-header",
            "--no-annotate",
            "--quiet",
        ],
        input="\n".join(requirements) + "\n",
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise PackageError(f"the requirements cannot be resolved for Python {python}:\n{done.stderr.strip()}")
    return done.stdout


def pack(root: Path, meta: PackageMeta, lock_text: str, files: list[str]) -> bytes:
    """A tar whose bytes depend on content only: sorted names, time 0, owner 0, modes 0644/0755."""
    meta = PackageMeta(**{**asdict(meta), "files": tuple(files)})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries: list[tuple[str, bytes, int]] = [(META, meta.to_json(), 0o644), (LOCK, lock_text.encode(), 0o644)]
        for name in files:
            path = root / name
            mode = 0o755 if os.access(path, os.X_OK) else 0o644
            entries.append((name, path.read_bytes(), mode))
        for name, content, mode in sorted(entries):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), mode, 0
            tar.addfile(info, io.BytesIO(content))
            if buffer.tell() > MAX_PACKAGE:
                raise PackageError(f"the package is over the limit of {MAX_PACKAGE:,} bytes (at {name})")
    return buffer.getvalue()


Check = Callable[[PackageMeta, str], PackageMeta]  # (meta, lock) -> meta, after trying it in its environment


def build(root: Path, uv: str, manifest: str = MANIFEST, wanted_format: str = "", check: Check | None = None) -> Built:
    """Lock and pack the folder `root` as its manifest (`mllambda.yaml`, or another file in it) describes.

    `check`, when given, runs before packing: it may refuse the package (PackageError) or complete
    its metadata (a saved model's signature, read by its own library in its own environment)."""
    meta, requirements = read_manifest(root, manifest, wanted_format)
    files = package_files(root)
    module = meta.entry.split(":")[0].split(".")[0]
    if not meta.format and f"{module}.py" not in files and not any(f.startswith(f"{module}/") for f in files):
        raise PackageError(f"entry: {meta.entry}: no {module}.py or {module}/ in {root}")
    lock_text = lock(requirements, uv, meta.python)
    if check is not None:
        meta = check(meta, lock_text)
    archive = pack(root, meta, lock_text, files)
    return Built(archive, hashlib.sha256(archive).hexdigest(), read_meta(archive), lock_text)


def read_meta(archive: bytes) -> PackageMeta:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return PackageMeta.from_json(_member(tar, META))


def read_member(archive: bytes, name: str) -> bytes:
    """One file of the package (PackageError if it has none by that name)."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return _member(tar, name)


def read_lock(archive: bytes) -> str:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return _member(tar, LOCK).decode()


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    try:
        handle = tar.extractfile(name)
    except KeyError as err:
        raise PackageError(f"not a model package: it has no {name}") from err
    if handle is None:
        raise PackageError(f"not a model package: {name} is not a file")
    return handle.read()


def unpack(archive: bytes, digest: str, into: Path) -> Path:
    """The package's files under `into/<digest>`, once: checked against the digest, written whole or not at all."""
    actual = hashlib.sha256(archive).hexdigest()
    if actual != digest:
        raise PackageError(f"the package's content does not match its digest (sha256 {actual}, expected {digest})")
    target = into / digest
    if target.is_dir():
        return target
    into.mkdir(parents=True, exist_ok=True)
    partial = into / f".{digest}.{os.getpid()}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(partial, filter="data")  # no absolute paths, no .., no links out, no devices
    try:
        partial.rename(target)
    except OSError:  # another replica unpacked it first
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
    return target


def chunks(data: bytes, size: int = 1 << 20) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def describe_lock(lock_text: str) -> list[str]:
    """`name==version` lines of a lock, for people (hashes and markers left out)."""
    return [line.split(";")[0].split(" \\")[0].strip() for line in lock_text.splitlines() if "==" in line]
