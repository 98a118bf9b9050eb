"""A runtime that fails to start while a flag file exists: a model whose native library broke, on demand.

`MLLAMBDA_TEST_CRASH_FILE` names the file; the runtime's loader exits with an error while it is there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any


def load() -> None:
    flag = os.environ.get("MLLAMBDA_TEST_CRASH_FILE", "")
    if flag and Path(flag).exists():
        print("flaky: libbroken.so: cannot open shared object file (the crash flag is set)", file=sys.stderr)
        sys.exit(3)


def predict(payload: dict[str, Any]) -> dict[str, Any]:
    return {"flaky": "ok", **payload}
