"""Tools for the agent's tests: well-behaved and not."""

import os
import sys
import threading
import time

from snakepit import Context, tool

_calls = {"n": 0}
_lock = threading.Lock()


@tool
def noop():
    return None


@tool
def add(a: int, b: int) -> int:
    return a + b


@tool
def count() -> int:
    """How many calls of count this process has served (itself included)."""
    with _lock:
        _calls["n"] += 1
        return _calls["n"]


@tool
def chatty(text: str) -> str:
    print("chatty says", text)
    print("chatty warns", text, file=sys.stderr)
    return text


@tool
def boom(message: str):
    raise KeyError(message)


@tool
def unencodable():
    return {"when": {1, 2}}


@tool
def crash(code: int = 9):
    os._exit(code)


@tool
def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@tool
def hold(marker: str, ctx: Context, limit: float = 30.0) -> str:
    """Run until cancelled (or limit), then write how it ended to marker."""
    end = time.monotonic() + limit
    how = "finished"
    while time.monotonic() < end:
        if ctx.cancelled:
            how = "cancelled"
            break
        time.sleep(0.002)
    with open(marker, "w") as f:
        f.write(how)
    return how


@tool
def big(n: int) -> str:
    return "x" * n


@tool
def pid() -> int:
    return os.getpid()
