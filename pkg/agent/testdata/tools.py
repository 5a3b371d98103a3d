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


@tool
def gil_sleep(seconds: int) -> None:
    """Sleep in C while holding the GIL: the worker cannot answer anything."""
    import ctypes

    ctypes.PyDLL(None).sleep(int(seconds))


@tool
def compute(seconds: float) -> int:
    """Busy pure-Python loop; the GIL still switches between threads."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


_hoard = []


@tool
def leak(mb: int) -> int:
    """Keep mb MiB more, on purpose."""
    _hoard.append(b"x" * (mb << 20))
    return len(_hoard)


@tool
def stubborn(seconds: float) -> float:
    """Ignore cancellation."""
    time.sleep(seconds)
    return seconds


@tool
def env(name: str):
    return os.environ.get(name)


@tool
def prefix() -> str:
    return sys.prefix


@tool
def spawn_sleeper() -> int:
    """Start a grandchild process that outlives this call."""
    import subprocess

    return subprocess.Popen(["sleep", "300"]).pid


@tool
def ignore_term() -> int:
    """Make this worker ignore SIGTERM."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return os.getpid()


@tool
def tally(ctx: Context) -> dict:
    """Count this session's calls in its store."""
    if ctx.session is None:
        return {"n": None, "pid": os.getpid()}
    ctx.session["n"] = ctx.session.get("n", 0) + 1
    return {"n": ctx.session["n"], "pid": os.getpid()}


@tool
def count_stream(n: int, size: int = 0):
    """Yield n items (with size bytes of padding each); return n."""
    pad = "x" * size
    for i in range(n):
        yield {"i": i, "pad": pad}
    return n


@tool
def endless_stream(marker: str):
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
def fail_stream(n: int):
    for i in range(n):
        yield i
    raise RuntimeError("stream broke after %d items" % n)


@tool
def progress_stream(n: int, size: int, progress: str):
    """Yield n items; every 1000 items, write how many were produced."""
    pad = "x" * size
    for i in range(n):
        if i % 1000 == 0:
            with open(progress, "w") as f:
                f.write(str(i))
        yield {"i": i, "pad": pad}
    return n
