"""The local stack and run folders under hostile conditions: a closed pipe, a second `up`, reused PIDs, shared /tmp."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import files
from controlplane.config import PROJECT_ROOT
from controlplane.node import processes
from runtime_sdk.serve import ServeError, remove_socket
from tests.helpers.stack import mllambda

SMALL = {
    "kind": "Stack",
    "name": "small",
    "runtimes": [{"model": "tokenize", "version": "v1", "target": "examples.trivial.models:tokenize"}],
    "pipelines": [{"name": "one", "stages": [{"name": "t", "variants": [{"model": "tokenize", "version": "v1"}]}]}],
}


def small_stack(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    ports = {k: processes.free_port() for k in ("consul", "xds", "admin", "gateway", "gateway_admin")}
    ports["controlplane_metrics"] = processes.free_port()
    path = tmp_path / "stack.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "ports": ports}))
    return path, {"MLLAMBDA_STATE_DIR": str(tmp_path / "state"), "MLLAMBDA_ADMIN_ADDR": f"127.0.0.1:{ports['admin']}"}


def recorded(tmp_path: Path) -> list[dict[str, Any]]:
    return list(json.loads((tmp_path / "state" / "stack.json").read_text())["processes"])


def still_ours(entries: list[dict[str, Any]]) -> list[str]:
    return [e["name"] for e in entries if processes.start_time(e["pid"]) == e["started"]]


@pytest.mark.slow
def test_ctrl_c_with_the_output_pipe_closed_still_stops_everything(tmp_path: Path) -> None:
    """`mllambda up | tee log`, then Ctrl-C: tee dies first, and nothing must be left running."""
    path, env = small_stack(tmp_path)
    up = subprocess.Popen(
        [sys.executable, "-m", "controlplane.cli", "up", "-f", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
        cwd=PROJECT_ROOT,
        start_new_session=True,
    )
    assert up.stdout is not None
    lines = []
    for raw in up.stdout:
        lines.append(raw.decode(errors="replace"))
        if "Ctrl-C stops everything" in lines[-1]:
            break
    entries = recorded(tmp_path)
    try:
        assert len(still_ours(entries)) >= 4, "".join(lines)
        up.stdout.close()  # the reader is gone, like tee after Ctrl-C
        os.killpg(up.pid, signal.SIGINT)
        up.wait(timeout=60)
        deadline = time.monotonic() + 20
        while still_ours(entries) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert still_ours(entries) == []
        assert not (tmp_path / "state" / "stack.json").exists()
    finally:  # a failure here must not leave a stack running on the machine
        up.kill()
        for entry in entries:
            if processes.start_time(entry["pid"]) == entry["started"]:
                processes.stop_group(int(entry["pid"]), timeout=5)


@pytest.mark.slow
def test_a_second_up_is_refused_and_leaves_the_first_stacks_record_so_down_stops_it(tmp_path: Path) -> None:
    path, env = small_stack(tmp_path)
    first = mllambda("up", "-f", str(path), "--detach", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    entries = recorded(tmp_path)
    try:
        second = mllambda("up", "-f", str(path), env=env)
        assert second.returncode == 1 and "already running" in second.stderr, second.stderr
        assert recorded(tmp_path) == entries  # untouched
        assert len(still_ours(entries)) == len(entries)
    finally:
        down = mllambda("down", env=env)
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    assert still_ours(entries) == []


def test_down_leaves_a_process_alone_whose_pid_was_reused(tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        state = tmp_path / "state"
        state.mkdir()
        entry = {"name": "gateway", "pid": bystander.pid, "started": 1}  # what was recorded: another process
        (state / "stack.json").write_text(json.dumps({"stack": "old", "processes": [entry]}))
        down = mllambda("down", env={"MLLAMBDA_STATE_DIR": str(state)})
        assert down.returncode == 0 and "left alone" in down.stdout, down.stdout
        assert bystander.poll() is None  # still running
    finally:
        bystander.kill()


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_stopping_a_process_that_already_exited_never_signals_whoever_has_its_pid_now(tmp_path: Path) -> None:
    # PIDs wrap (32,768 here, threads included): a runtime that exited minutes ago may have handed its number to
    # another test's control plane, which a stop by that number would SIGTERM.
    exited = processes.ManagedProcess("exited", ["true"], tmp_path / "exited.log").start()
    assert exited.popen is not None
    exited.popen.wait(timeout=10)
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        exited.popen.pid = bystander.pid  # what PID reuse does: the reaped number now names another process
        exited.stop(timeout=1)
        processes.stop_all([exited], timeout=1)
        time.sleep(0.3)  # a signal, had one been sent, has arrived
        assert bystander.poll() is None, "a stop by a stale PID reached another process"
    finally:
        bystander.kill()
        bystander.wait()


def test_stopping_a_leader_that_exited_still_kills_what_it_left_in_its_group(tmp_path: Path) -> None:
    child_file = tmp_path / "child"
    argv = ["sh", "-c", f"sleep 60 & echo $! > {child_file}"]
    stops = (
        lambda proc: proc.stop(timeout=1),
        lambda proc: processes.stop_all([proc], timeout=1),
        # as `mllambda down` stops a group it did not start: a leader already gone is not waited for (30 s here)
        lambda proc: processes.stop_group(proc.pid, timeout=30),
    )
    for stop in stops:
        leader = processes.ManagedProcess("leader", argv, tmp_path / "leader.log").start()
        assert leader.popen is not None
        leader.popen.wait(timeout=10)
        child = int(child_file.read_text())
        assert not gone(child) and processes.group_has_members(leader.pid)
        began = time.monotonic()
        stop(leader)
        assert time.monotonic() - began < 5, "a stop waited out its grace for a leader already gone"
        deadline = time.monotonic() + 10
        while not gone(child):
            assert time.monotonic() < deadline, "the grandchild outlived its group's stop"
            time.sleep(0.05)


def test_run_folders_must_be_private_and_only_our_sockets_are_removed(tmp_path: Path) -> None:
    mine = files.private_dir(tmp_path / "run")
    assert mine.stat().st_mode & 0o777 == 0o700
    readable = tmp_path / "readable"
    readable.mkdir(mode=0o755)
    assert files.private_dir(readable).stat().st_mode & 0o777 == 0o700  # ours: closed, not refused
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    for bad, why in ((tmp_path / "link", "symlink"), (open_to_all, "open to other users")):
        with pytest.raises(PermissionError, match=why):
            files.private_dir(bad)
    done = mllambda(
        "runtime",
        "examples.trivial.models:tokenize",
        "--model=t",
        "--version=v1",
        env={"MLLAMBDA_RUN_DIR": str(open_to_all)},
        timeout=60,
    )
    assert done.returncode == 1 and "chmod 700" in done.stderr, done.stderr

    precious = mine / "notes.txt"
    precious.write_text("keep me")
    with pytest.raises(ServeError, match="not a socket of ours"):
        remove_socket(str(precious))
    assert precious.read_text() == "keep me"
    stale = mine / "old.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))
    remove_socket(str(stale))
    assert not stale.exists()


def test_the_refusal_diagnostic_names_who_listens_on_a_port_and_nobody_once_it_closes() -> None:
    from tests.helpers.sockets import listeners

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    assert f"pid {os.getpid()} " in listeners(port)
    held.close()
    assert listeners(port) == "nobody"
