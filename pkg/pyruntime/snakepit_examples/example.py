"""The example adapter snakepitd serves when no configuration is given."""

import os
import time

from snakepit import Context, tool


@tool
def noop():
    """Do nothing and return null (useful to measure overhead)."""
    return None


@tool
def echo(**kwargs):
    """Return the arguments it was given."""
    return kwargs


@tool
def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


@tool
def upper(text: str) -> str:
    """Return text in upper case."""
    return text.upper()


@tool
def sleep(seconds: float, ctx: Context) -> float:
    """Sleep for a while, returning early (with the time slept) when the call
    is cancelled."""
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        if ctx.cancelled:
            break
        time.sleep(min(0.01, max(0.0, end - time.monotonic())))
    return time.monotonic() - start


@tool
def fail(message: str = "failed on purpose"):
    """Raise a ValueError with the given message."""
    raise ValueError(message)


@tool
def whoami(ctx: Context) -> dict:
    """Report the worker process and the call's ids."""
    return {"pid": os.getpid(), "request_id": ctx.request_id, "session_id": ctx.session_id}


@tool
def count(n: int = 10, delay: float = 0.0):
    """Yield 0..n-1, one at a time: a streaming tool (spctl exec --stream)."""
    for i in range(n):
        if delay:
            time.sleep(delay)
        yield i


@tool
def note(ctx: Context, text: str = "") -> list:
    """Add text to this session's notes and return them all (use --session)."""
    if ctx.session is None:
        raise ValueError("note keeps state per session: pass a session id")
    notes = ctx.session.setdefault("notes", [])
    if text:
        notes.append(text)
    return notes
