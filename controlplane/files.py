"""Folders and files only we can use, files written whole or not at all, and logs kept to a size."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def private_dir(path: Path) -> Path:
    """A folder only we can use: created 0700, or refused if it is a symlink, someone else's, or open to others.

    Run folders live under the shared temp directory, where another user could
    have made the path first to read our sockets or plant files.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{path} is not a plain folder (a symlink?); remove it or choose another")
    if info.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {info.st_uid}, not us; remove it or choose another")
    if info.st_mode & 0o022:  # others could have put things in it
        raise PermissionError(f"{path} is open to other users (mode {info.st_mode & 0o777:o}); `chmod 700` it")
    if info.st_mode & 0o077:  # ours, readable by others (an older version made it so): close it
        path.chmod(0o700)
    return path


def write_whole(path: Path, data: bytes) -> None:
    """`path` holds `data` or what it held before, never a part: written aside, then renamed over it."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_bytes(data)
    partial.replace(path)


def cap_log(path: Path, max_bytes: int) -> bool:
    """Keep a log its writer holds open (O_APPEND) within `max_bytes`: past it, the file is copied to
    `<name>.1` (replacing the older copy) and cut to nothing in place; the writer goes on at its start.
    Lines written between the copy and the cut are lost (logrotate's copytruncate). True if it was cut."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
        older = path.with_name(path.name + ".1")
        with open(path, "rb") as source, open(older.with_name(f".{older.name}.part"), "wb") as copy:
            while chunk := source.read(1024 * 1024):
                copy.write(chunk)
        older.with_name(f".{older.name}.part").replace(older)
        os.truncate(path, 0)
        return True
    except FileNotFoundError:
        return False
