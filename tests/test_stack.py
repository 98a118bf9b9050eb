"""Stack files: every problem named with its place, before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from controlplane.config import PROJECT_ROOT
from controlplane.errors import CliError
from controlplane.pipeline.spec import parse_pipeline
from controlplane.stack.file import load_stack

BAD = """
kind: Stack
name: bad
kafka: "yes"
gateway_concurency: 2
ports: {gateway: "abc", gatway_admin: 19001}
runtimes:
  - {model: a, version: v1, target: "examples.trivial.models:tokenize", replicas: "two", args: "--inline"}
  - {model: b, version: 2}
  - just-a-string
pipelines:
  - {name: p, stages: []}
"""


def test_every_problem_in_a_stack_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "stack.yaml"
    path.write_text(BAD)
    with pytest.raises(CliError) as err:
        load_stack(path)
    message = str(err.value)
    for expected in (
        "gateway_concurency: unknown field",
        "ports.gateway: expected a whole number from 1 to 65535, got 'abc'",
        "ports.gatway_admin: unknown field (known: consul, xds, admin, gateway, gateway_admin",
        "runtimes[0].replicas: expected a whole number from 1 to 100, got 'two'",
        "runtimes[0].args: expected a list of flags",
        "runtimes[1]: missing version, target (strings)",
        "runtimes[2]: expected a mapping",
        "pipelines[0].",
        "kafka: expected true or false, got 'yes'",
    ):
        assert expected in message, message


def test_the_example_stacks_load() -> None:
    stack = load_stack(PROJECT_ROOT / "examples/nlp/stack.yaml")
    assert stack.runtimes and stack.pipelines


def test_up_with_a_bad_stack_file_says_so_and_starts_nothing(tmp_path: Path) -> None:
    path = tmp_path / "stack.yaml"
    path.write_text(BAD)
    result = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "up", "-f", str(path)],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env={"MLLAMBDA_STATE_DIR": str(tmp_path / "state")},
    )
    assert result.returncode == 1
    assert "has problems" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "state" / "logs").exists()


def test_every_example_pipeline_is_valid_and_names_only_models_the_stack_runs() -> None:
    stack = load_stack(PROJECT_ROOT / "examples/nlp/stack.yaml")
    running = {(r.model, r.version) for r in stack.runtimes}
    files = sorted((PROJECT_ROOT / "examples/nlp").glob("pipeline-*.yaml"))
    assert len(files) >= 4
    for path in files:
        pipeline = parse_pipeline(yaml.safe_load(path.read_text()))
        assert pipeline.models() <= running, (path.name, pipeline.models() - running)
