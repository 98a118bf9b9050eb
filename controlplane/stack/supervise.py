"""Restarts for the local stack's processes: back-off that doubles, a reset after a steady run, a failing state.

Every process `mllambda up` starts (Consul, Kafka, the control plane, the gateway,
each runtime replica) is started again when it exits: after 1 s, then 2, 4 ... 60 s
while it keeps exiting, from the first second again once it has run for `STEADY`.
One that exited `FAILING` times in a row is reported as failing with its last lines
(the stack's log, `mllambda status`); it is still retried at the longest back-off,
and nothing else stops. Pure bookkeeping: the caller starts and stops processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0
STEADY = 30.0  # seconds of running after which the next exit starts the back-off anew
FAILING = 3  # exits in a row after which the process is reported as failing
TAIL_LINES = 8


@dataclass
class Book:
    """One supervised process: its exits in a row, restarts, when it may start again, and how it last ended."""

    name: str
    started_at: float = 0.0  # monotonic, of the current run
    exits: int = 0  # in a row (reset after a steady run)
    restarts: int = 0  # in all
    retry_at: float = 0.0  # monotonic: when it may start again (after an exit)
    down_pid: int = 0  # the PID whose exit was counted (0: running)
    last_exit: str = ""  # "exit 1" / "killed by signal 9", and when
    last_lines: str = ""

    @property
    def state(self) -> str:
        if self.down_pid == 0:
            return "running"
        return "failing" if self.exits >= FAILING else "restarting"

    def ran(self, now: float) -> None:
        """Called while it runs: a steady run forgets the exits before it."""
        if self.down_pid == 0 and self.exits and now - self.started_at >= STEADY:
            self.exits = 0

    def exited(self, pid: int, code: int | None, tail: str, now: float) -> float:
        """Count an exit (once per PID); the seconds until it starts again."""
        if self.down_pid != pid:
            self.down_pid = pid
            self.exits += 1
            self.retry_at = now + backoff(self.exits)
            self.last_exit = f"{describe_exit(code)} at {time.strftime('%H:%M:%S')}"
            self.last_lines = "\n".join(tail.splitlines()[-TAIL_LINES:])
        return max(0.0, self.retry_at - now)

    def due(self, now: float) -> bool:
        return self.down_pid != 0 and now >= self.retry_at

    def restarted(self, now: float) -> None:
        self.down_pid, self.started_at = 0, now
        self.restarts += 1

    def to_json(self) -> dict[str, object]:
        return {
            "state": self.state,
            "restarts": self.restarts,
            "exits_in_a_row": self.exits,
            "last_exit": self.last_exit,
            "last_lines": self.last_lines,
        }


def backoff(exits: int) -> float:
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, exits - 1))


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited"
    return f"killed by signal {-code}" if code < 0 else f"exit {code}"
