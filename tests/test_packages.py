"""Model packages without a control plane: the manifest's problems, content addressing, the store's checks."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from controlplane.models.envs import find_uv
from controlplane.models.package import PackageError, build, pack, read_manifest, requirement_lines, unpack
from controlplane.models.store import BadPackage, Trouble, parse_trouble, read_blob

BARE = Path(__file__).parent / "data" / "packages" / "bare"


def copy(tmp_path: Path, source: Path = BARE) -> Path:
    target = tmp_path / "pkg"
    shutil.copytree(source, target)
    return target


def test_the_same_content_gives_the_same_digest_wherever_and_whenever_it_is_built(tmp_path: Path) -> None:
    first = build(BARE, find_uv())
    again = copy(tmp_path)
    (again / "echo.py").touch()  # a new mtime, another folder: content is what counts
    assert build(again, find_uv()).digest == first.digest
    (again / "echo.py").write_text((again / "echo.py").read_text() + "\n# changed\n")
    assert build(again, find_uv()).digest != first.digest


def test_every_manifest_problem_is_named_at_once(tmp_path: Path) -> None:
    root = copy(tmp_path)
    manifest = "kind: Modle\nentry: 'echo predict'\nloader: 3\nweights: x\nexamples: nope.jsonl\n"
    (root / "mllambda.yaml").write_text(manifest)
    with pytest.raises(PackageError) as err:
        read_manifest(root)
    text = str(err.value)
    for field in ("kind:", "entry:", "loader:", "weights: unknown field", "examples:"):
        assert field in text, text


def test_reference_data_that_does_not_read_is_refused_at_build_line_by_line(tmp_path: Path) -> None:
    root = copy(tmp_path)
    manifest = (root / "mllambda.yaml").read_text()
    (root / "mllambda.yaml").write_text(manifest + "reference: train.jsonl\n")
    (root / "train.jsonl").write_text('{"x": 1}\n{"x": \n{"request": [1]}\n')
    with pytest.raises(PackageError) as err:
        read_manifest(root)
    assert "reference line 2: not JSON" in str(err.value) and "reference line 3: request and answer" in str(err.value)
    (root / "train.jsonl").write_text('{"x": 1}\n{"request": {"x": 2}, "answer": {"y": 0}}\n')
    assert read_manifest(root)[0].reference == "train.jsonl"
    (tmp_path / "outside.jsonl").write_text('{"x": 1}\n')
    (root / "mllambda.yaml").write_text(manifest + "reference: ../outside.jsonl\n")
    with pytest.raises(PackageError, match=r"reference: '\.\./outside\.jsonl' is not a file of the package"):
        read_manifest(root)


def test_a_package_without_a_manifest_or_its_entry_module_is_refused(tmp_path: Path) -> None:
    root = copy(tmp_path)
    (root / "mllambda.yaml").unlink()
    with pytest.raises(PackageError, match="missing"):
        build(root, find_uv())
    (root / "mllambda.yaml").write_text("kind: Model\nentry: predictor:predict\n")
    with pytest.raises(PackageError, match=r"no predictor\.py"):
        build(root, find_uv())


def test_requirements_that_reach_outside_the_package_or_cannot_resolve_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="only packages from an index"):
        requirement_lines("numpy\n-e ../elsewhere\n")
    root = copy(tmp_path)
    (root / "requirements.txt").write_text("scikit-learn==0.0.1\n")
    with pytest.raises(PackageError, match="cannot be resolved") as err:
        build(root, find_uv())
    assert "scikit-learn" in str(err.value)  # uv's own message names the dependency


def test_a_symlink_is_refused(tmp_path: Path) -> None:
    root = copy(tmp_path)
    (root / "weights.bin").symlink_to("/etc/passwd")
    with pytest.raises(PackageError, match="symlink"):
        build(root, find_uv())


def test_a_changed_or_truncated_archive_is_never_unpacked_or_served(tmp_path: Path) -> None:
    built = build(BARE, find_uv())
    with pytest.raises(PackageError, match="does not match its digest"):
        unpack(built.archive[:-512], built.digest, tmp_path / "packages")
    assert not (tmp_path / "packages" / built.digest).exists()
    blob = tmp_path / "store" / "sha256" / f"{built.digest}.tar"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(built.archive.replace(b"return", b"retURN"))
    with pytest.raises(BadPackage, match="tampered or truncated"):
        read_blob(tmp_path / "store", built.digest)


def test_an_archive_holds_only_the_models_files_and_its_lock(tmp_path: Path) -> None:
    root = copy(tmp_path)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "echo.cpython-311.pyc").write_bytes(b"x")
    built = build(root, find_uv())
    assert built.meta.files == ("echo.py", "mllambda.yaml")
    folder = unpack(built.archive, built.digest, tmp_path / "packages")
    assert sorted(p.name for p in folder.iterdir()) == [".mllambda", "echo.py", "mllambda.yaml"]
    assert hashlib.sha256(built.archive).hexdigest() == built.digest


def test_an_oversized_package_is_refused_while_packing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import controlplane.models.package as package

    root = copy(tmp_path)
    (root / "weights.bin").write_bytes(b"\0" * 70_000)
    monkeypatch.setattr(package, "MAX_PACKAGE", 64 * 1024)
    meta, _ = read_manifest(root)
    with pytest.raises(PackageError, match="over the limit of 65,536 bytes"):
        pack(root, meta, "", ["echo.py", "weights.bin"])


def test_only_a_runtime_of_the_model_may_fetch_its_package() -> None:
    from controlplane.models.server import may_fetch

    own = ["spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/classifier"]
    other = ["spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/features"]
    assert may_fetch(own, "classifier")
    assert not may_fetch(other, "classifier")
    assert not may_fetch([], "classifier")  # a certificate of our CA without an identity
    assert may_fetch(None, "classifier")  # plaintext: the listener is on loopback only


def test_a_fetched_archive_that_is_not_what_the_record_says_is_not_kept(tmp_path: Path) -> None:
    from controlplane.models.store import write_blob

    built = build(BARE, find_uv())
    with pytest.raises(BadPackage, match="does not match"):
        write_blob(tmp_path, built.digest, built.archive + b"\0")
    assert list(tmp_path.rglob("*.tar")) == [] and list(tmp_path.rglob(".*")) == []
    assert write_blob(tmp_path, built.digest, built.archive).read_bytes() == built.archive


def test_environments_for_older_sdks_are_pruned_unless_in_use(tmp_path: Path) -> None:
    """Each SDK change builds new environments; the older ones of a lock go, beyond one, unless a process uses one."""
    import os
    import subprocess
    import sys
    import time

    from controlplane.models.envs import prune

    lock_id = "ab" * 32
    made = []
    for n, sdk in enumerate(("sdk1", "sdk2", "sdk3", "sdk4", "")):  # "": named before SDK hashes were
        env = tmp_path / (f"{lock_id}-{sdk}" if sdk else lock_id)
        (env / "bin").mkdir(parents=True)
        os.utime(env, (time.time() + n if sdk else 0, time.time() + n if sdk else 0))
        made.append(env)
    other = tmp_path / f"{'cd' * 32}-sdk1"  # another lock's: never touched
    other.mkdir()
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(made[0] / "bin" / "python")])
    try:
        removed = prune(tmp_path, lock_id, made[3])
    finally:
        busy.kill()
        busy.wait()
    assert removed == [made[1], made[4]]  # sdk3 kept (the newest older one), sdk1 in use; sdk2 and the oldest go
    assert made[0].exists() and made[2].exists() and made[3].exists() and other.exists()


def test_a_host_keeps_only_the_packages_and_environments_of_stored_versions(tmp_path: Path) -> None:
    """Deleting versions leaves nothing behind, except what a running process still uses."""
    import subprocess
    import sys

    from controlplane.models.envs import prune_host

    for folder in (
        "packages/aaa",
        "packages/bbb",
        "packages/ccc",
        "packages/.partial",
        "envs/lock1-sdk",
        "envs/lock2-sdk",
        "envs/lock3-sdk",
        "envs/lock4",
    ):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "envs" / "lock2-sdk.log").write_text("built")
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    runs_in_ccc = subprocess.Popen(sleeper, cwd=tmp_path / "packages" / "ccc")  # a runtime in its package folder
    runs_from_lock3 = subprocess.Popen([*sleeper, str(tmp_path / "envs" / "lock3-sdk" / "bin")])
    try:
        removed = prune_host(tmp_path, digests={"aaa"}, locks={"lock1"})
    finally:
        for proc in (runs_in_ccc, runs_from_lock3):
            proc.kill()
            proc.wait()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in removed) == [
        "envs/lock2-sdk",
        "envs/lock4",
        "packages/bbb",
    ]
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("*/*"))
    assert left == ["envs/lock1-sdk", "envs/lock3-sdk", "packages/.partial", "packages/aaa", "packages/ccc"]


async def test_the_store_holds_a_bounded_number_of_versions_and_models(consul_agent: Any, tmp_path: Path) -> None:
    """Against a real Consul: one version more than a model may keep is refused, with what to do, until one goes."""
    import consul.aio

    from controlplane.models.store import ModelStore, StoreFull, write_blob

    built = build(BARE, find_uv())
    write_blob(tmp_path, built.digest, built.archive)
    client = consul.aio.Consul(port=consul_agent.http_port)
    store = ModelStore(client, tmp_path, kv_prefix=f"bounds-{tmp_path.name}", limits=(2, 2))
    try:
        for version in ("v1", "v2"):
            await store.check_room("echo", version)
            await store.record("echo", version, built.digest, by="test")
        with pytest.raises(StoreFull, match=r"model echo has 2 versions.*mllambda delete model echo:VERSION"):
            await store.check_room("echo", "v3")
        await store.check_room("echo", "v2")  # one it holds: an upload of the same again is fine
        await store.record("other", "v1", built.digest, by="test")
        with pytest.raises(StoreFull, match="the store holds 2 models"):
            await store.check_room("third", "v1")
        await store.delete("echo", "v1")
        await store.check_room("echo", "v3")
    finally:
        await client.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"model": "m", "version": "v1", "failures": 0, "tail": "x", "at": 1, "retry_at": 2}',  # no failure
        b'{"model": "m", "version": "v1", "failures": true, "tail": "x", "at": 1, "retry_at": 2}',
        b'{"model": "m", "version": "v1", "failures": 1.5, "tail": "x", "at": 1, "retry_at": 2}',
        b'{"model": "m", "version": "v1", "failures": 1, "tail": ["x"], "at": 1, "retry_at": 2}',
        b'{"model": "m", "version": "v1", "failures": 1, "tail": "x", "at": "soon", "retry_at": 2}',
        b'{"model": "m", "version": "v1", "failures": 1, "tail": "x", "at": 1}',
        b'{"model": "m", "version": "v1", "failures": 1, "tail": "x", "at": 1, "retry_at": 1e300}',  # no date
        b'{"model": "m", "version": "v1", "failures": 1, "tail": "x", "at": NaN, "retry_at": 2}',
        b'{"model": "m", "version": "v1", "failures": 1, "tail": "x", "at": -1, "retry_at": 2}',
        json.dumps({"model": "m", "version": "v1", "failures": 1, "tail": "x" * 2001, "at": 1, "retry_at": 2}).encode(),
        b"{" + b" " * 9000 + b"}",
    ],
)
def test_a_replica_trouble_record_that_is_not_what_a_stack_writes_is_not_shown(raw: bytes) -> None:
    assert parse_trouble(raw) is None


def test_a_failing_replicas_own_words_are_escaped_on_the_models_page_and_quoted_in_the_terminal() -> None:
    """What a replica printed (its model's error) is whatever its code wrote: markup, escape sequences."""
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb
    from controlplane.admin.model_cli import trouble_lines
    from controlplane.web.manage import models_page

    tail = "Traceback\n<script>alert(1)</script>\n\x1b[31mred\x1b[0m"
    trouble = Trouble("m", "v1", 3, tail, 1_700_000_000.0, 1_700_000_008.0)
    assert parse_trouble(trouble.to_json()) == trouble
    told = pb.ReplicaTrouble(failures=3, tail=tail, at=trouble.at, retry_at=trouble.retry_at)
    version = pb.ModelVersion(model="m", version="v1", digest="0" * 64, deployed=True, replicas=2, trouble=told)
    page = models_page([version], [], None, "", "")
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page, page
    assert "3 exits in a row; again at 22:13:28 UTC" in page and "\x1b[31m" in page  # HTML shows ESC harmlessly
    lines = trouble_lines(version)
    assert lines[0].startswith("Failing:      3 replica exits in a row, the last at 2023-11-14T22:13:20Z"), lines
    assert "    <script>alert(1)</script>" in lines and all("\x1b" not in line for line in lines), lines
    assert "    '\\x1b[31mred\\x1b[0m'" in lines, lines
    assert trouble_lines(pb.ModelVersion(model="m", version="v1")) == []
