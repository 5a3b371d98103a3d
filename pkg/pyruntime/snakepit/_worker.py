"""The worker side of snakepitd's framed protocol. Started by snakepitd as
``python -m snakepit._worker`` with two inherited sockets: fd 3 carries calls
and their results, fd 4 carries control frames (heartbeats, cancellation),
read by a thread of its own so a busy worker still answers. Not meant to be
run by hand.

Frame: a 16-byte little-endian header (payload length u32, type u8, flags u8,
reserved u16, request id u64) followed by the payload. The daemon's Go side
(pkg/worker/protocol.go) is the authority on the layout.
"""

import importlib
import importlib.util
import inspect
import json
import os
import queue
import socket
import struct
import sys
import threading
import traceback

import snakepit
from snakepit import Cancelled, Context, ToolError

PROTOCOL_VERSION = 1

HDR = struct.Struct("<IBBHQ")
CALL_HDR = struct.Struct("<IIHHHH")
CALL_HDR_SIZE = CALL_HDR.size
U32 = struct.Struct("<I")

# Frame types; keep in step with pkg/worker/protocol.go.
T_HELLO = 1
T_CALL = 2
T_RESULT = 3
T_ERROR = 4
T_CANCEL = 5
T_PING = 6
T_PONG = 7
T_FATAL = 8
T_CHUNK = 9
T_CREDIT = 10
T_CLOSE_SESSION = 11

# Call flags (the header's flags byte).
F_STREAM = 1  # the caller reads a stream: a generator's items go as chunks
F_SESSION_TRANSIENT = 2  # the session's state lives on another worker

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_encode = _encoder.encode
_decode = json.loads


class _Conn(object):
    def __init__(self, fd):
        os.set_inheritable(fd, False)
        self.sock = socket.socket(fileno=fd)
        self.rfile = self.sock.makefile("rb", buffering=1 << 16)
        self.lock = threading.Lock()
        self._sendall = self.sock.sendall
        self._pack = HDR.pack

    def send(self, typ, rid, payload=b""):
        hdr = self._pack(len(payload), typ, 0, 0, rid)
        with self.lock:
            if len(payload) < 65536:
                self._sendall(hdr + payload)
            else:
                self._sendall(hdr)
                self._sendall(payload)

    def recv(self):
        hdr = self.rfile.read(16)
        if len(hdr) < 16:
            return None
        n, typ, flags, _res, rid = HDR.unpack(hdr)
        payload = self.rfile.read(n) if n else b""
        if len(payload) < n:
            return None
        return typ, flags, rid, payload


def _type_name(annotation):
    if annotation is inspect.Parameter.empty:
        return ""
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type) and not getattr(annotation, "__args__", None):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


class _Tool(object):
    __slots__ = ("name", "fn", "wants_ctx", "is_async", "spec", "streaming")

    def __init__(self, name, fn, doc):
        self.name = name
        self.fn = fn
        sig = inspect.signature(fn)
        self.wants_ctx = False
        params = []
        for p in sig.parameters.values():
            if p.name == "ctx" or p.annotation is Context or p.annotation == "Context":
                self.wants_ctx = True
                continue
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            entry = {"name": p.name, "type": _type_name(p.annotation), "required": p.default is p.empty}
            if p.default is not p.empty:
                try:
                    entry["default_json"] = _encode(p.default)
                except (TypeError, ValueError):
                    pass
            params.append(entry)
        self.is_async = inspect.iscoroutinefunction(fn)
        self.spec = {
            "name": name,
            "doc": doc if doc is not None else (inspect.getdoc(fn) or ""),
            "parameters": params,
            "streaming": inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn),
        }
        self.streaming = self.spec["streaming"]


def _load_module(spec):
    if spec.endswith(".py") or os.sep in spec:
        path = os.path.abspath(spec)
        name = os.path.splitext(os.path.basename(path))[0]
        directory = os.path.dirname(path)
        if directory not in sys.path:
            sys.path.insert(0, directory)
        mspec = importlib.util.spec_from_file_location(name, path)
        if mspec is None:
            raise ImportError("cannot load adapter file %r" % path)
        module = importlib.util.module_from_spec(mspec)
        sys.modules[name] = module
        mspec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def _marked(obj):
    return getattr(obj, snakepit._TOOL_ATTR, None)


def load_adapter(spec):
    """Import the adapter named by spec ("module", "module:Class",
    "path/file.py" or "path/file.py:Class"), run its setup hooks and return
    its tools by name."""
    module_spec, _, class_name = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if not module_spec:
        module_spec, class_name = spec, ""
    module = _load_module(module_spec)
    target = module
    if class_name:
        cls = getattr(module, class_name, None)
        if cls is None or not inspect.isclass(cls):
            raise ImportError("adapter %r has no class %r" % (module_spec, class_name))
        target = cls()
    else:
        has_functions = any(
            _marked(v) for v in vars(module).values() if inspect.isfunction(v)
        )
        if not has_functions:
            classes = [
                v
                for v in vars(module).values()
                if inspect.isclass(v)
                and v.__module__ == module.__name__
                and any(_marked(m) for m in vars(v).values())
            ]
            if len(classes) == 1:
                target = classes[0]()
    tools = {}
    setups = []
    for attr in dir(target):
        try:
            value = getattr(target, attr)
        except Exception:  # properties of a class adapter may raise
            continue
        if not callable(value):
            continue
        if inspect.ismodule(target) and getattr(value, "__module__", None) not in (module.__name__, None):
            # tools imported from elsewhere belong to their own adapter
            if not _marked(value):
                continue
        mark = _marked(value)
        if mark:
            name = mark["name"]
            if name in tools:
                raise ImportError("adapter %r declares tool %r twice" % (spec, name))
            tools[name] = _Tool(name, value, mark["doc"])
        if getattr(value, snakepit._SETUP_ATTR, False):
            setups.append(value)
    if not tools:
        raise ImportError("adapter %r declares no tools: mark functions with @snakepit.tool" % spec)
    for fn in setups:
        fn()
    return tools


def _error(kind, exc=None, message=None, with_traceback=True, skip_frames=0):
    body = {"kind": kind}
    if exc is not None:
        body["type"] = type(exc).__name__
        body["message"] = str(exc) if message is None else message
        if with_traceback:
            tb = exc.__traceback__
            for _ in range(skip_frames):
                if tb is not None and tb.tb_next is not None:
                    tb = tb.tb_next
            body["traceback"] = "".join(traceback.format_exception(type(exc), exc, tb))
    else:
        body["message"] = message or ""
    try:
        return _encode(body).encode("utf-8")
    except Exception:
        return json.dumps({"kind": kind, "message": repr(body.get("message"))}).encode("utf-8")


class Worker(object):
    def __init__(self, conn, tools, capacity, max_result):
        self.max_result = max_result
        self.conn = conn
        self.tools = tools
        self.capacity = capacity
        self.calls = queue.SimpleQueue()
        self.inflight = {}  # call id -> Context, for cancellation
        self.streams = {}  # call id -> _Credits
        self.sessions = {}  # session id -> dict
        self.local = threading.local()

    def start_threads(self, ctl):
        threading.Thread(target=self.control, args=(ctl,), name="snakepit-control", daemon=True).start()
        if self.capacity == 1:
            return
        for i in range(self.capacity):
            t = threading.Thread(target=self._run_calls, name="snakepit-call-%d" % i, daemon=True)
            t.start()

    def serve(self):
        """Read calls until the daemon closes its end. With capacity 1 the
        call runs on this thread (no hand-off on the hot path); otherwise
        the calls go to the pool of call threads."""
        recv = self.conn.recv
        inline = self.capacity == 1
        call = self._guarded_call
        put = self.calls.put
        while True:
            frame = recv()
            if frame is None:
                return
            typ, flags, rid, payload = frame
            if typ == T_CALL:
                if inline:
                    call(rid, flags, payload)
                else:
                    put((rid, flags, payload))
            elif typ == T_CLOSE_SESSION:
                self.sessions.pop(payload.decode("utf-8"), None)
            else:
                sys.stderr.write("snakepit worker: unexpected frame type %d on the call socket\n" % typ)

    def control(self, ctl):
        """Answer heartbeats and take cancellations until the daemon closes
        the control socket; runs on its own thread."""
        try:
            while True:
                frame = ctl.recv()
                if frame is None:
                    break
                typ, _flags, rid, payload = frame
                if typ == T_PING:
                    ctl.send(T_PONG, rid)
                elif typ == T_CANCEL:
                    ctx = self.inflight.get(rid)
                    if ctx is not None:
                        ctx._cancelled = True
                        st = self.streams.get(rid)
                        if st is not None:
                            st.add(0)  # wake a generator waiting for credit
                elif typ == T_CREDIT:
                    st = self.streams.get(rid)
                    if st is not None:
                        st.add(U32.unpack(payload)[0])
                else:
                    sys.stderr.write("snakepit worker: unexpected frame type %d on the control socket\n" % typ)
        finally:
            os._exit(0)

    def _run_calls(self):
        get = self.calls.get
        call = self._guarded_call
        while True:
            rid, flags, payload = get()
            call(rid, flags, payload)

    def _guarded_call(self, rid, flags, payload):
        try:
            self._call(rid, flags, payload)
        except BaseException:  # never lose a call: answer it
            try:
                self.conn.send(T_ERROR, rid, _error("internal", sys.exc_info()[1]))
            except Exception:
                pass

    def _call(self, rid, flags, p):
        send = self.conn.send
        timeout_ms, window, tl, sl, rl, cl = CALL_HDR.unpack_from(p, 0)
        o = CALL_HDR_SIZE
        name = p[o : o + tl].decode("utf-8")
        o += tl
        tool = self.tools.get(name)
        if tool is None:
            send(T_ERROR, rid, _error("unknown_tool", message="no tool %r" % name))
            return
        raw = p[o + sl + rl + cl :]
        try:
            kwargs = _decode(raw) if raw else {}
        except ValueError as e:
            send(T_ERROR, rid, _error("invalid_args", message="args are not valid JSON: %s" % e))
            return
        if type(kwargs) is not dict:
            send(T_ERROR, rid, _error("invalid_args", message="args must be a JSON object, got %s" % type(kwargs).__name__))
            return
        stream = flags & F_STREAM
        if tool.streaming and not stream:
            send(T_ERROR, rid, _error("stream_required", message="tool %s yields a stream: call it with ExecuteStream (spctl exec --stream)" % name))
            return
        if cl:
            _call_local.cid = p[o + sl + rl : o + sl + rl + cl].decode("utf-8")
        ctx = None
        if tool.wants_ctx or stream:
            session_id = p[o : o + sl].decode("utf-8")
            o += sl
            request_id = p[o : o + rl].decode("utf-8")
            store = None
            if session_id:
                if flags & F_SESSION_TRANSIENT:
                    store = {}
                else:
                    store = self.sessions.get(session_id)
                    if store is None:
                        store = self.sessions[session_id] = {}
            ctx = Context(request_id, session_id, timeout_ms, store, getattr(_call_local, "cid", ""))
            if tool.wants_ctx:
                kwargs["ctx"] = ctx
            self.inflight[rid] = ctx
        try:
            try:
                if tool.is_async:
                    result = self._run_async(tool.fn(**kwargs))
                else:
                    result = tool.fn(**kwargs)
                if stream and tool.streaming:
                    result = self._stream(rid, name, ctx, result, window)
            except TypeError as e:
                if e.__traceback__ is not None and e.__traceback__.tb_next is None:
                    # Raised while binding the arguments, not inside the tool.
                    send(T_ERROR, rid, _error("invalid_args", message="%s: %s" % (name, e)))
                    return
                send(T_ERROR, rid, _error("exception", e, skip_frames=1))
                return
            except Cancelled as e:
                send(T_ERROR, rid, _error("cancelled", e, with_traceback=False))
                return
            except _TooLarge as e:
                send(T_ERROR, rid, _error("too_large", message=str(e)))
                return
            except _NotJSON as e:
                send(T_ERROR, rid, _error("encode", message=str(e)))
                return
            except ToolError as e:
                send(T_ERROR, rid, _error("exception", e, with_traceback=False))
                return
            except Exception as e:
                # The first frame is this runtime's; the user's code follows.
                send(T_ERROR, rid, _error("exception", e, skip_frames=1))
                return
            try:
                out = self._encode_value(name, result, "result")
            except (_TooLarge, _NotJSON) as e:
                send(T_ERROR, rid, _error("too_large" if isinstance(e, _TooLarge) else "encode", message=str(e)))
                return
            send(T_RESULT, rid, out)
        finally:
            if ctx is not None:
                self.inflight.pop(rid, None)
            if cl:
                _call_local.cid = ""

    def _encode_value(self, name, value, what):
        try:
            out = _encode(value).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise _NotJSON("%s of %s cannot be encoded as JSON: %s" % (what, name, e))
        if len(out) > self.max_result:
            raise _TooLarge("%s of %s is %d bytes of JSON, over the node's maximum of %d (max_message_bytes)" % (what, name, len(out), self.max_result))
        return out

    def _stream(self, rid, name, ctx, gen, window):
        """Send a generator's items as chunks, at most `window` ahead of what
        the daemon has acknowledged; return the generator's return value.
        Cancellation raises Cancelled inside the generator at its yield."""
        credits = _Credits(window)
        self.streams[rid] = credits
        agen = None
        if inspect.isasyncgen(gen):
            agen, gen = gen, None
        send = self.conn.send
        try:
            while True:
                try:
                    if agen is not None:
                        item = self._run_async(agen.__anext__())
                    else:
                        item = next(gen)
                except StopIteration as stop:
                    return stop.value
                except StopAsyncIteration:
                    return None
                if not credits.take(ctx):
                    why = "deadline passed" if (ctx._mono_deadline is not None and not ctx._cancelled) else "cancelled"
                    exc = Cancelled("stream %s %s" % (ctx.request_id, why))
                    try:
                        if agen is not None:
                            self._run_async(agen.athrow(exc))
                        else:
                            gen.throw(exc)
                    except (Cancelled, StopIteration, StopAsyncIteration):
                        pass
                    raise exc
                send(T_CHUNK, rid, self._encode_value(name, item, "an item"))
        finally:
            self.streams.pop(rid, None)
            if gen is not None:
                gen.close()
            elif agen is not None:
                try:
                    self._run_async(agen.aclose())
                except Exception:
                    pass

    def _run_async(self, coro):
        loop = getattr(self.local, "loop", None)
        if loop is None:
            import asyncio  # only adapters with async tools pay for it

            loop = asyncio.new_event_loop()
            self.local.loop = loop
        return loop.run_until_complete(coro)


# Output of a tool during a call is tagged with the call's correlation id:
# each line it starts carries this marker, which the daemon strips and logs
# as the line's correlation_id field (pkg/worker: relay).
_TAG_START = "\x1esp:"
_TAG_END = "\x1f"
_call_local = threading.local()


class _TaggedStream(object):
    """Wraps sys.stdout/sys.stderr so lines written during a call carry the
    call's correlation id."""

    def __init__(self, raw):
        self._raw = raw
        self._at_line_start = True

    def write(self, s):
        cid = getattr(_call_local, "cid", "")
        if not cid or not s:
            if s:
                self._at_line_start = s.endswith("\n")
            return self._raw.write(s)
        tag = _TAG_START + cid + _TAG_END
        parts = s.split("\n")
        out = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part and (i > 0 or self._at_line_start):
                part = tag + part
            out.append(part)
        self._at_line_start = s.endswith("\n")
        self._raw.write("\n".join(out))
        return len(s)

    def __getattr__(self, name):
        return getattr(self._raw, name)


class _TooLarge(Exception):
    pass


class _NotJSON(Exception):
    pass


class _Credits(object):
    """How many more chunks a stream may send before the daemon acknowledges
    some: the daemon's buffer for the stream never overflows."""

    __slots__ = ("n", "cond")

    def __init__(self, n):
        self.n = max(1, n)
        self.cond = threading.Condition(threading.Lock())

    def add(self, k):
        with self.cond:
            self.n += k
            self.cond.notify()

    def take(self, ctx):
        """Wait for a credit; False once the call is cancelled or past its
        deadline."""
        with self.cond:
            while True:
                if ctx.cancelled:
                    return False
                if self.n > 0:
                    self.n -= 1
                    return True
                left = ctx.remaining()
                self.cond.wait(left if left is not None else None)


def main():
    sys.stdout = _TaggedStream(sys.stdout)
    sys.stderr = _TaggedStream(sys.stderr)
    conn = _Conn(3)
    ctl = _Conn(4)
    adapter = os.environ.get("SNAKEPIT_ADAPTER", "")
    capacity = int(os.environ.get("SNAKEPIT_CAPACITY", "1"))
    try:
        if not adapter:
            raise ImportError("SNAKEPIT_ADAPTER is not set")
        tools = load_adapter(adapter)
    except BaseException as e:
        conn.send(T_FATAL, 0, _error("adapter", e))
        sys.stderr.flush()
        os._exit(3)
    hello = {
        "protocol": PROTOCOL_VERSION,
        "pid": os.getpid(),
        "python": "%d.%d.%d" % sys.version_info[:3],
        "tools": [t.spec for t in tools.values()],
    }
    max_result = int(os.environ.get("SNAKEPIT_MAX_RESULT", "0")) or (1 << 62)
    worker = Worker(conn, tools, max(1, capacity), max_result)
    worker.start_threads(ctl)
    conn.send(T_HELLO, 0, _encode(hello).encode("utf-8"))
    try:
        worker.serve()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
