"""snakepit: write tools in Python, serve them from snakepitd.

An adapter is a module (or a class in a module) whose tools are marked with
the ``@tool`` decorator::

    from snakepit import tool

    @tool
    def add(a: int, b: int) -> int:
        "Add two integers."
        return a + b

A tool receives the request's JSON arguments as keyword arguments. A tool
that declares a parameter named ``ctx`` (or annotated with ``Context``) also
receives the call's context: request and session ids, deadline and a
cancellation flag. A function marked ``@setup`` runs once per worker process
before the worker takes calls (load a model there). For a class adapter the
class is instantiated once per process; its ``__init__`` is its setup.

Only the Python standard library is used; Python >= 3.9.
"""

import time as _time

__all__ = ["tool", "setup", "Context", "Cancelled", "ToolError"]

_TOOL_ATTR = "__snakepit_tool__"
_SETUP_ATTR = "__snakepit_setup__"


def tool(fn=None, *, name=None, doc=None):
    """Mark a function or method as a tool.

    Use as ``@tool`` or ``@tool(name="other_name", doc="...")``. The
    function is returned unchanged.
    """

    def mark(f):
        setattr(f, _TOOL_ATTR, {"name": name or f.__name__, "doc": doc})
        return f

    if fn is None:
        return mark
    return mark(fn)


def setup(fn):
    """Mark a function (or method of a class adapter) to run once per worker
    process, before the worker reports ready."""
    setattr(fn, _SETUP_ATTR, True)
    return fn


class Cancelled(Exception):
    """Raised inside a tool (by ``Context.check()``) once its call is
    cancelled: the client went away or the deadline passed."""


class ToolError(Exception):
    """An error a tool raises on purpose. The client sees its message; no
    traceback is attached."""


class Context(object):
    """What a tool knows about the call it serves.

    Attributes:
        request_id: the request id the client sent or the node assigned.
        session_id: the caller's session id, or "" for sessionless calls.
        session: a dict that lives in this worker process for the session's
            lifetime: what a tool stores there, the session's next call
            finds. None for sessionless calls. When the node had to run the
            call elsewhere (the session's worker was busy, affinity "hint"),
            it is an empty dict that is dropped after the call; the response
            tells the client so.
        deadline: absolute time (``time.time()``) by which the call must end,
            or None when it has none.
        correlation_id: ties the call's log lines together across nodes;
            lines the tool prints during the call carry it in the daemon's
            log.
    """

    __slots__ = ("request_id", "session_id", "session", "deadline", "correlation_id", "_cancelled", "_mono_deadline", "_wake")

    def __init__(self, request_id="", session_id="", timeout_ms=0, session=None, correlation_id=""):
        self.request_id = request_id
        self.correlation_id = correlation_id
        self.session_id = session_id
        self.session = session
        self._cancelled = False
        self._wake = None
        if timeout_ms:
            self.deadline = _time.time() + timeout_ms / 1000.0
            self._mono_deadline = _time.monotonic() + timeout_ms / 1000.0
        else:
            self.deadline = None
            self._mono_deadline = None

    @property
    def cancelled(self):
        """True once the call was cancelled or its deadline passed."""
        if self._cancelled:
            return True
        if self._mono_deadline is not None and _time.monotonic() >= self._mono_deadline:
            return True
        return False

    def remaining(self):
        """Seconds left before the deadline, or None without one."""
        if self._mono_deadline is None:
            return None
        return max(0.0, self._mono_deadline - _time.monotonic())

    def check(self):
        """Raise Cancelled if the call was cancelled or timed out."""
        if self.cancelled:
            raise Cancelled("call %s cancelled" % self.request_id)
