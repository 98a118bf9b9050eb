"""The `mllambda` command line as a user runs it, with an environment of the test's."""

from __future__ import annotations

import os
import subprocess
import sys

from controlplane.config import PROJECT_ROOT


def mllambda(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controlplane.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=timeout,
        cwd=PROJECT_ROOT,
    )
