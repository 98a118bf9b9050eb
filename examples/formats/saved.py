"""Models saved by their own libraries, for the format tests and benchmarks: `train(OUT)`.

The training runs in an environment of its own (requirements-train.txt, built by uv like
a package's, shared by identical locks), never ML Lambda's: OUT/<format>/ then holds each
model as a user would hand it over, and OUT/<format>.expected.json what its library answers.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from controlplane.config import cache_dir
from controlplane.models.envs import ensure_env, env_python, find_uv
from controlplane.models.package import lock, lock_hash, python_version, requirement_lines

HERE = Path(__file__).parent


def training_env() -> Path:
    requirements = requirement_lines((HERE / "requirements-train.txt").read_text())
    python = python_version()
    locked = lock(requirements, find_uv(), python)
    return ensure_env(cache_dir() / "envs", locked, lock_hash(locked, python), python)


def train(out: Path) -> Path:
    done = subprocess.run(
        [str(env_python(training_env())), str(HERE / "train.py"), str(out)], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"training failed:\n{done.stderr[-3000:]}")
    return out
