"""When this process started, so that a fit's breakdown counts the seconds before its first hook (interpreter,
imports, reading the config, building the Trainer) as "start" rather than leaving them out.

The command line marks it (``mark_command_start``); a fit started from Python (a notebook, tests) is not marked
and its breakdown begins at ``setup``.
"""

from __future__ import annotations

import os
import time

_IMPORTED = time.perf_counter()
_COMMAND_STARTED: float | None = None


def process_age() -> float:
    """Seconds since the operating system started this process (Linux: /proc; elsewhere: since this import)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks
            booted = float(uptime.read().split()[0])
        return max(0.0, booted - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _IMPORTED


def mark_command_start() -> None:
    """Called by the command line: the process start becomes the fit breakdown's zero."""
    global _COMMAND_STARTED
    _COMMAND_STARTED = time.perf_counter() - process_age()


def command_started() -> float | None:
    """``time.perf_counter()`` at the process start when the command line marked it, else None."""
    return _COMMAND_STARTED
