"""Tools that leave processes behind, for the daemon's orphan tests."""

import os
import signal
import subprocess

from snakepit import tool


@tool
def spawn_sleeper() -> int:
    """Start a grandchild that outlives the call."""
    return subprocess.Popen(["sleep", "300"]).pid


@tool
def ignore_term() -> int:
    """Make this worker ignore SIGTERM and return its pid."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return os.getpid()
