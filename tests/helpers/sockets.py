"""Who listens on a loopback TCP port (/proc/net/tcp and each process's fds): said when a call is refused."""

from __future__ import annotations

import os
from pathlib import Path

LISTEN = "0A"  # the TCP state column of /proc/net/tcp


def listening_inodes(port: int) -> set[str]:
    """Socket inodes in LISTEN on `port` (any IPv4 address)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) > 9 and fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
            found.add(fields[9])
    return found


def listeners(port: int) -> str:
    """'pid 123 (cmdline)' for each process holding a listening socket on `port`, or 'nobody'."""
    inodes = {f"socket:[{inode}]" for inode in listening_inodes(port)}
    holders = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or not inodes:
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
            if any(os.readlink(f"/proc/{entry.name}/fd/{fd}") in inodes for fd in fds):
                cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                holders.append(f"pid {entry.name} ({cmd[:120].strip()})")
        except OSError:
            continue
    return "; ".join(holders) or ("nobody" if not inodes else f"sockets {sorted(inodes)} (holder not found)")
