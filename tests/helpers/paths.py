"""Short folders for Unix sockets (a socket's path must fit in 108 bytes, pytest's tmp_path is too long), all under
one folder per test process that is removed when the process exits."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

_root: list[Path] = []


def short_dir(prefix: str = "") -> Path:
    if not _root:
        _root.append(Path(tempfile.mkdtemp(prefix="mll-")))
        atexit.register(shutil.rmtree, _root[0], True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_root[0]))
