"""Tools that misbehave on purpose, for the worker's tests."""

import os
import sys
import time

from snakepit import Context, tool


@tool
def noop():
    return None


@tool
def add(a: int, b: int) -> int:
    return a + b


@tool
def chatty(text: str) -> str:
    print("chatty says", text)
    sys.stdout.flush()
    print("chatty warns", text, file=sys.stderr)
    return text


@tool
def boom(message: str):
    raise RuntimeError(message)


@tool
def unencodable():
    return {"when": object()}


@tool
def crash(code: int = 7):
    sys.stderr.write("about to crash\n")
    sys.stderr.flush()
    os._exit(code)


@tool
def segfault():
    import ctypes

    ctypes.string_at(0)


@tool
def wait_cancel(ctx: Context, limit: float = 10.0) -> str:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if ctx.cancelled:
            return "cancelled"
        time.sleep(0.005)
    return "not cancelled"


@tool
def pid() -> int:
    return os.getpid()


@tool
def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@tool
def context(ctx: Context) -> dict:
    return {"request_id": ctx.request_id, "session_id": ctx.session_id, "has_deadline": ctx.deadline is not None, "correlation_id": ctx.correlation_id}


_barriers = {}


@tool
def barrier(parties: int, timeout: float = 10.0) -> bool:
    """Return True once `parties` calls wait here at the same time."""
    import threading

    b = _barriers.setdefault(parties, threading.Barrier(parties))
    b.wait(timeout)
    return True


@tool
def counter(n: int):
    """Yield 0..n-1, then return "done"."""
    for i in range(n):
        yield i
    return "done"


@tool
async def async_counter(n: int):
    for i in range(n):
        yield {"i": i}


@tool
def failing_stream(n: int):
    for i in range(n):
        yield i
    raise ValueError("broke after %d" % n)


@tool
def endless(marker: str, ctx: Context):
    """Yield forever; write to marker how it ended."""
    i = 0
    try:
        while True:
            yield i
            i += 1
    except BaseException as e:
        with open(marker, "w") as f:
            f.write(type(e).__name__)
        raise


@tool
def remember(ctx: Context, key: str = "", value: int = 0) -> dict:
    """Store key=value in the session (when key is given); return the store."""
    if ctx.session is None:
        return None
    if key:
        ctx.session[key] = value
    return dict(ctx.session)
