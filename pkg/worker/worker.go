// Package worker supervises one Python worker process: it spawns it in its
// own process group, performs the handshake, multiplexes concurrent calls over
// the framed protocol on an inherited socket (fd 3), relays the process's
// stdout and stderr to the log, and reports how the process ended.
//
// A Worker knows nothing about pools or queues; pkg/agent decides which worker
// gets a call and counts its free slots.
package worker

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
)

// ID is a worker's slot number in its pool, from 0. It is stable for the
// life of the daemon: the process replacing a crashed or recycled worker keeps
// the ID and gets a new Generation.
type ID uint64

// Generation tells apart the processes that have served one worker slot. It
// is unique on the node across all pools and, because the agent seeds it from
// a counter persisted in the state directory, across restarts of the daemon:
// a (pool, ID, Generation) triple is never reused.
type Generation uint64

// Param describes one parameter of a tool.
type Param struct {
	Name        string `json:"name"`
	Type        string `json:"type"`
	Required    bool   `json:"required"`
	DefaultJSON string `json:"default_json"`
}

// Tool describes one tool as the adapter declares it.
type Tool struct {
	Name       string  `json:"name"`
	Doc        string  `json:"doc"`
	Parameters []Param `json:"parameters"`
	Streaming  bool    `json:"streaming"`
}

// Hello is the worker's handshake, sent once the adapter is loaded and its
// setup has run.
type Hello struct {
	Protocol int    `json:"protocol"`
	PID      int    `json:"pid"`
	Python   string `json:"python"`
	Tools    []Tool `json:"tools"`
}

// Spec says how to start a worker.
type Spec struct {
	Pool       string
	ID         ID
	Generation Generation
	// Python is the interpreter to run.
	Python string
	// Adapter names the user's module: "module", "module:Class",
	// "path/file.py" or "path/file.py:Class".
	Adapter string
	// Capacity is how many calls the worker runs at once (threads).
	Capacity int
	// Env is the complete environment of the process; Start adds the
	// protocol's own variables.
	Env []string
	// Dir is the working directory; empty means the daemon's.
	Dir string
	// MaxFrame bounds the size of a frame in either direction.
	MaxFrame int
	// MaxResult bounds the JSON of a result; a bigger one fails the call
	// with a ToolError of KindTooLarge, and the worker carries on.
	MaxResult int
	// StartTimeout bounds the time from spawn to handshake.
	StartTimeout time.Duration
	// StderrTail is how many of the last stderr lines are kept to explain a
	// crash.
	StderrTail int
	// HeartbeatInterval is how often the worker is pinged on its control
	// socket; 0 disables heartbeats.
	HeartbeatInterval time.Duration
	// HeartbeatTimeout is how long the worker may go without answering a
	// ping before it is killed as hung (ExitError.Cause CauseHung). Its
	// control thread answers even while tools run, unless native code holds
	// the GIL or the process is stopped.
	HeartbeatTimeout time.Duration
	// CancelGrace is how long a cancelled call may keep running in Python
	// before OnCancelIgnored is called.
	CancelGrace time.Duration
	// OnCancelIgnored is called (once per call) when a cancelled call is
	// still running CancelGrace after its cancellation.
	OnCancelIgnored func(*Worker)
	// OnExit is called once when the process has exited, before any call
	// in flight on it fails: the owner takes the worker out of service
	// there, so that a retried call cannot pick it again.
	OnExit func(*Worker)
	// OnRelease is called once for every Call, after the worker's side of
	// that call is over: its result or error arrived, the write failed, or
	// the process died. A call abandoned by its caller (cancelled) is released
	// only when the worker answers it, so a slot is never counted free while
	// Python still runs the call.
	OnRelease func(*Worker)
	Logger    zerolog.Logger
}

// Call is one call of a tool.
type Call struct {
	Tool          string
	Args          []byte
	SessionID     string
	RequestID     string
	CorrelationID string
	// Timeout is the time the tool has left; 0 means none. It reaches Python
	// as ctx.deadline.
	Timeout time.Duration
	// SessionTransient runs the call with an empty session store that is
	// dropped afterwards: the session's state lives on another worker.
	SessionTransient bool
}

// State is where a worker is in its life.
type State int32

// Worker states.
const (
	StateStarting State = iota
	StateReady
	StateStopping
	StateExited
)

func (s State) String() string {
	switch s {
	case StateStarting:
		return "starting"
	case StateReady:
		return "ready"
	case StateStopping:
		return "stopping"
	case StateExited:
		return "exited"
	}
	return "unknown"
}

type reply struct {
	payload []byte
	err     error
}

type pending struct {
	ch     chan reply
	chunks chan []byte // nil for unary calls
}

var pendingPool = sync.Pool{New: func() any { return &pending{ch: make(chan reply, 1)} }}

// drainWait bounds how long a dead worker's last output and frames are
// awaited before its calls are failed.
const drainWait = 100 * time.Millisecond

var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

// Worker is one running Python worker process. Its methods are safe for
// concurrent use.
type Worker struct {
	spec    Spec
	log     zerolog.Logger
	cmd     *exec.Cmd
	pid     int
	started time.Time
	// startTicks is the process start time from /proc (see ProcStat).
	startTicks uint64
	conn       net.Conn // calls and their results
	ctl        net.Conn // heartbeats and cancellations
	hello      Hello

	wmu   sync.Mutex // serialises writes to conn
	ctlMu sync.Mutex // serialises writes to ctl

	mu      sync.Mutex
	pending map[uint64]*pending
	nextID  uint64
	closed  bool  // no new calls: the worker is stopping or gone
	exitErr error // set once the process is gone

	state     atomic.Int32
	served    atomic.Uint64
	stopping  atomic.Bool // the daemon asked it to stop
	lastPong  atomic.Int64
	ready     chan struct{}
	exited    chan struct{}
	done      chan struct{}
	readDone  chan struct{}
	startErr  error // guarded by mu
	stderrMu  sync.Mutex
	stderr    []string
	outputsWG sync.WaitGroup
}

// Start spawns a worker and waits until it has loaded its adapter and sent
// its handshake, ctx is done, or Spec.StartTimeout passes. On failure the
// process is gone when Start returns; a *StartError carries the Python
// traceback when the adapter failed to import.
func Start(ctx context.Context, spec Spec) (*Worker, error) {
	if spec.Capacity < 1 {
		spec.Capacity = 1
	}
	w := &Worker{
		spec:     spec,
		log:      spec.Logger.With().Str("pool", spec.Pool).Uint64("worker_id", uint64(spec.ID)).Uint64("generation", uint64(spec.Generation)).Logger(),
		pending:  make(map[uint64]*pending),
		ready:    make(chan struct{}),
		exited:   make(chan struct{}),
		done:     make(chan struct{}),
		readDone: make(chan struct{}),
	}
	if err := w.spawn(); err != nil {
		return nil, &StartError{Pool: spec.Pool, Adapter: spec.Adapter, Err: err}
	}
	var timeout <-chan time.Time
	if spec.StartTimeout > 0 {
		t := time.NewTimer(spec.StartTimeout)
		defer t.Stop()
		timeout = t.C
	}
	select {
	case <-w.ready:
		w.state.Store(int32(StateReady))
		if st, err := ReadProcStat(w.pid); err == nil {
			w.startTicks = st.StartTicks
		}
		if spec.HeartbeatInterval > 0 && spec.HeartbeatTimeout > 0 {
			go w.heartbeat()
		}
		return w, nil
	case <-w.done:
		w.mu.Lock()
		defer w.mu.Unlock()
		if w.startErr != nil {
			return nil, w.startErr
		}
		return nil, &StartError{Pool: spec.Pool, Adapter: spec.Adapter, Err: w.exitErr}
	case <-timeout:
		w.Kill()
		<-w.done
		return nil, &StartError{Pool: spec.Pool, Adapter: spec.Adapter,
			Err: fmt.Errorf("no handshake within %s (a slow setup hook? raise the pool's start_timeout)", spec.StartTimeout)}
	case <-ctx.Done():
		w.Kill()
		<-w.done
		return nil, &StartError{Pool: spec.Pool, Adapter: spec.Adapter, Err: ctx.Err()}
	}
}

// socketPair returns the daemon's end of a new socketpair as a net.Conn (on
// Go's poller) and the child's end as a file to inherit.
func socketPair(name string) (net.Conn, *os.File, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	parent := os.NewFile(uintptr(fds[0]), name)
	child := os.NewFile(uintptr(fds[1]), name+"-child")
	conn, err := net.FileConn(parent)
	parent.Close()
	if err != nil {
		child.Close()
		return nil, nil, fmt.Errorf("socket: %w", err)
	}
	return conn, child, nil
}

func (w *Worker) spawn() (err error) {
	var closers []io.Closer
	defer func() {
		if err != nil {
			for _, c := range closers {
				c.Close()
			}
		}
	}()
	conn, child, err := socketPair("snakepit-calls")
	if err != nil {
		return err
	}
	defer child.Close()
	closers = append(closers, conn)
	ctl, ctlChild, err := socketPair("snakepit-control")
	if err != nil {
		return err
	}
	defer ctlChild.Close()
	closers = append(closers, ctl)
	outR, outW, err := os.Pipe()
	if err != nil {
		return err
	}
	defer outW.Close()
	closers = append(closers, outR)
	errR, errW, err := os.Pipe()
	if err != nil {
		return err
	}
	defer errW.Close()
	closers = append(closers, errR)
	cmd := exec.Command(w.spec.Python, "-m", "snakepit._worker")
	cmd.Env = append(w.spec.Env[:len(w.spec.Env):len(w.spec.Env)],
		"SNAKEPIT_ADAPTER="+w.spec.Adapter,
		fmt.Sprintf("SNAKEPIT_CAPACITY=%d", w.spec.Capacity),
		fmt.Sprintf("SNAKEPIT_WORKER_ID=%d", w.spec.ID),
		fmt.Sprintf("SNAKEPIT_WORKER_GENERATION=%d", w.spec.Generation),
		"SNAKEPIT_POOL="+w.spec.Pool,
		fmt.Sprintf("SNAKEPIT_MAX_RESULT=%d", w.spec.MaxResult),
	)
	cmd.Dir = w.spec.Dir
	cmd.Stdin = nil
	cmd.Stdout = outW
	cmd.Stderr = errW
	cmd.ExtraFiles = []*os.File{child, ctlChild}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", w.spec.Python, err)
	}
	w.cmd = cmd
	w.pid = cmd.Process.Pid
	w.started = time.Now()
	w.conn = conn
	w.ctl = ctl
	w.lastPong.Store(w.started.UnixNano())
	w.log = w.log.With().Int("pid", w.pid).Logger()
	w.outputsWG.Add(2)
	go w.relay(outR, "stdout")
	go w.relay(errR, "stderr")
	go w.readLoop()
	go w.controlLoop()
	go w.wait()
	return nil
}

// A line a tool writes during a call starts with outputTagStart, the call's
// correlation id and outputTagEnd (see _TaggedStream in the runtime).
const (
	outputTagStart = "\x1esp:"
	outputTagEnd   = "\x1f"
)

// relay turns the process's output into log lines, each tagged with the
// correlation id of the call that wrote it.
func (w *Worker) relay(r *os.File, stream string) {
	defer w.outputsWG.Done()
	defer r.Close()
	br := bufio.NewReaderSize(r, 16<<10)
	for {
		line, err := br.ReadString('\n')
		if len(line) > 0 {
			line = strings.TrimRight(line, "\r\n")
			cid := ""
			if rest, ok := strings.CutPrefix(line, outputTagStart); ok {
				if id, text, ok := strings.Cut(rest, outputTagEnd); ok {
					cid, line = id, text
				}
			}
			if stream == "stderr" {
				w.keepStderr(line)
			}
			ev := w.log.Info().Str("stream", stream)
			if cid != "" {
				ev = ev.Str("correlation_id", cid)
			}
			ev.Str("line", line).Msg("worker output")
		}
		if err != nil {
			return
		}
	}
}

func (w *Worker) keepStderr(line string) {
	n := w.spec.StderrTail
	if n <= 0 {
		return
	}
	w.stderrMu.Lock()
	if len(w.stderr) >= n {
		copy(w.stderr, w.stderr[1:])
		w.stderr = w.stderr[:n-1]
	}
	w.stderr = append(w.stderr, line)
	w.stderrMu.Unlock()
}

// StderrTail returns a copy of the last lines the worker wrote to stderr.
func (w *Worker) StderrTail() []string {
	w.stderrMu.Lock()
	defer w.stderrMu.Unlock()
	return append([]string(nil), w.stderr...)
}

// wait reaps the process and fails what was in flight.
func (w *Worker) wait() {
	st, _ := w.cmd.Process.Wait()
	// No new calls from now on; the pool stops choosing this worker.
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
	if w.spec.OnExit != nil {
		w.spec.OnExit(w)
	}
	close(w.exited)
	// Give the output relays a moment to drain the last lines, which
	// explain most crashes; a grandchild holding the pipes open must not
	// delay the failure of the calls in flight.
	// The same goes for frames still buffered in the socket (a fatal frame
	// explaining a failed start); a forked grandchild may hold the socket
	// open, so that wait is bounded too.
	drained := make(chan struct{})
	go func() { w.outputsWG.Wait(); <-w.readDone; close(drained) }()
	t := time.NewTimer(drainWait)
	select {
	case <-drained:
	case <-t.C:
	}
	t.Stop()
	ee := &ExitError{Pool: w.spec.Pool, ID: w.spec.ID, Generation: w.spec.Generation, PID: w.pid, Code: -1}
	if st != nil {
		if ws, ok := st.Sys().(syscall.WaitStatus); ok {
			if ws.Signaled() {
				ee.Signal = ws.Signal()
			} else {
				ee.Code = ws.ExitStatus()
			}
		}
	}
	ee.StderrTail = w.StderrTail()
	ee.Cause = classify(ee.Code, ee.Signal, ee.StderrTail, w.stopping.Load())
	w.mu.Lock()
	if w.exitErr == nil {
		w.exitErr = ee
	} else if pe, ok := w.exitErr.(*ExitError); ok {
		// The cause was decided when the daemon killed it (protocol, hung).
		pe.Code, pe.Signal, pe.StderrTail = ee.Code, ee.Signal, ee.StderrTail
	}
	w.closed = true
	failed := w.pending
	w.pending = make(map[uint64]*pending)
	err := w.exitErr
	w.mu.Unlock()
	w.conn.Close()
	w.ctl.Close()
	w.state.Store(int32(StateExited))
	// Kill what is left of the process group (grandchildren).
	_ = killGroup(w.pid, syscall.SIGKILL)
	for _, p := range failed {
		p.ch <- reply{err: err}
		w.release()
	}
	close(w.done)
}

func (w *Worker) release() {
	if w.spec.OnRelease != nil {
		w.spec.OnRelease(w)
	}
}

// readLoop dispatches the frames the worker sends.
func (w *Worker) readLoop() {
	defer close(w.readDone)
	fr := frameReader{r: bufio.NewReaderSize(w.conn, 64<<10), max: w.spec.MaxFrame}
	helloSeen := false
	for {
		t, id, payload, err := fr.next()
		if err != nil {
			// A closed or reset socket means the process is gone or going;
			// wait() reports how it ended. Only a frame that breaks the
			// protocol is the worker's fault.
			if errors.Is(err, errFrameTooLarge) {
				w.fatal(CauseProtocol, err)
			}
			return
		}
		switch t {
		case frameChunk:
			w.mu.Lock()
			p := w.pending[id]
			w.mu.Unlock()
			if p == nil {
				continue // the call was failed already
			}
			if p.chunks == nil {
				w.fatal(CauseProtocol, errors.New("chunk frame for a call that is not a stream"))
				return
			}
			select {
			case p.chunks <- payload:
			default:
				w.fatal(CauseProtocol, errors.New("stream sent more chunks than its credit"))
				return
			}
		case frameResult, frameError:
			w.mu.Lock()
			p := w.pending[id]
			delete(w.pending, id)
			w.mu.Unlock()
			if p == nil {
				continue // answered after the process was declared dead
			}
			// Release the slot before the caller learns the outcome, so
			// that its next call finds the worker free.
			w.served.Add(1)
			w.release()
			if t == frameResult {
				p.ch <- reply{payload: payload}
			} else {
				te := &ToolError{}
				if jerr := json.Unmarshal(payload, te); jerr != nil {
					te = &ToolError{Kind: KindInternal, Message: "undecodable error frame: " + jerr.Error()}
				}
				p.ch <- reply{err: te}
			}
		case frameHello:
			if helloSeen {
				w.fatal(CauseProtocol, errors.New("second hello frame"))
				return
			}
			helloSeen = true
			if err := json.Unmarshal(payload, &w.hello); err != nil {
				w.fatal(CauseProtocol, fmt.Errorf("bad hello: %w", err))
				return
			}
			if w.hello.Protocol != ProtocolVersion {
				w.fatal(CauseProtocol, fmt.Errorf("worker speaks protocol %d, daemon %d (mismatched runtime install?)", w.hello.Protocol, ProtocolVersion))
				return
			}
			close(w.ready)
		case frameFatal:
			te := &ToolError{}
			_ = json.Unmarshal(payload, te)
			w.mu.Lock()
			w.startErr = &StartError{Pool: w.spec.Pool, Adapter: w.spec.Adapter, Type: te.Type, Message: te.Message, Traceback: te.Traceback}
			w.mu.Unlock()
			// The worker exits on its own after a fatal frame.
		default:
			w.fatal(CauseProtocol, fmt.Errorf("unexpected %s frame", t))
			return
		}
	}
}

// heartbeat pings the worker and kills it when it stops answering.
func (w *Worker) heartbeat() {
	t := time.NewTicker(w.spec.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-w.done:
			return
		case now := <-t.C:
			if w.stopping.Load() {
				return
			}
			if since := now.Sub(w.LastPong()); since > w.spec.HeartbeatTimeout {
				w.Hang(fmt.Errorf("no heartbeat answer for %s (heartbeat_timeout %s)", since.Round(time.Millisecond), w.spec.HeartbeatTimeout))
				return
			}
			_ = w.Ping()
		}
	}
}

// controlLoop reads heartbeat answers from the control socket.
func (w *Worker) controlLoop() {
	fr := frameReader{r: bufio.NewReaderSize(w.ctl, 512), max: 1 << 10}
	for {
		t, _, _, err := fr.next()
		if err != nil {
			if errors.Is(err, errFrameTooLarge) {
				w.fatal(CauseProtocol, err)
			}
			return
		}
		if t != framePong {
			w.fatal(CauseProtocol, fmt.Errorf("unexpected %s frame on the control socket", t))
			return
		}
		w.lastPong.Store(time.Now().UnixNano())
	}
}

// fatal kills a worker that broke the protocol or stopped answering.
func (w *Worker) fatal(cause string, err error) {
	w.log.Error().Err(err).Str("cause", cause).Msg("killing worker")
	w.mu.Lock()
	if w.exitErr == nil {
		w.exitErr = &ExitError{Pool: w.spec.Pool, ID: w.spec.ID, Generation: w.spec.Generation, PID: w.pid, Code: -1, Signal: syscall.SIGKILL, Cause: cause}
	}
	w.closed = true
	w.mu.Unlock()
	w.Kill()
}

// Call sends one call to the worker and waits for its result, a Python error
// (*ToolError), the worker's death (*ExitError) or ctx. When ctx ends first,
// the call is cancelled in Python and Call returns ctx.Err() at once; the slot
// is released (Spec.OnRelease) only when Python has given up the call.
func (w *Worker) Call(ctx context.Context, c *Call) ([]byte, error) {
	p := pendingPool.Get().(*pending)
	id, err := w.send(c, p, 0, 0)
	if err != nil {
		return nil, err
	}
	select {
	case r := <-p.ch:
		pendingPool.Put(p)
		return r.payload, r.err
	case <-ctx.Done():
		w.abandon(id, c.Tool)
		return nil, ctx.Err()
	}
}

// Stream runs a call whose tool yields items (a Python generator) and hands
// each item, as JSON, to emit in order; it returns the generator's return
// value. At most window chunks are ever buffered between Python and emit: a
// slow emit (a slow client) makes the generator wait, so memory stays
// bounded. When emit fails or ctx ends, the call is cancelled in Python,
// where the generator gets Cancelled at its next yield.
func (w *Worker) Stream(ctx context.Context, c *Call, window int, emit func([]byte) error) ([]byte, error) {
	window = max(window, 1)
	p := &pending{ch: make(chan reply, 1), chunks: make(chan []byte, window)}
	id, err := w.send(c, p, flagStream, uint32(window))
	if err != nil {
		return nil, err
	}
	ackEvery := max(1, window/2)
	acked := 0
	deliver := func(chunk []byte) error {
		if err := emit(chunk); err != nil {
			w.abandon(id, c.Tool)
			return err
		}
		if acked++; acked >= ackEvery {
			w.credit(id, acked)
			acked = 0
		}
		return nil
	}
	for {
		select {
		case chunk := <-p.chunks:
			if err := deliver(chunk); err != nil {
				return nil, err
			}
		case r := <-p.ch:
			for {
				select {
				case chunk := <-p.chunks:
					if err := emit(chunk); err != nil {
						return nil, err
					}
					continue
				default:
				}
				return r.payload, r.err
			}
		case <-ctx.Done():
			w.abandon(id, c.Tool)
			return nil, ctx.Err()
		}
	}
}

// send registers p and writes the call frame. On failure the call is
// released and its error returned.
func (w *Worker) send(c *Call, p *pending, flags byte, window uint32) (uint64, error) {
	if len(c.Tool) > maxCallField || len(c.SessionID) > maxCallField || len(c.RequestID) > maxCallField || len(c.CorrelationID) > maxCallField {
		w.release()
		return 0, fmt.Errorf("tool name or id longer than %d bytes", maxCallField)
	}
	if c.SessionTransient {
		flags |= flagSessionTransient
	}
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		w.release()
		return 0, w.deathErr()
	}
	w.nextID++
	id := w.nextID
	w.pending[id] = p
	w.mu.Unlock()

	var ms uint32
	if c.Timeout > 0 {
		ms = uint32(min(int64(c.Timeout/time.Millisecond)+1, int64(^uint32(0))))
	}
	bp := bufPool.Get().(*[]byte)
	buf := appendCall((*bp)[:0], id, c, flags, ms, window)
	if w.spec.MaxFrame > 0 && len(buf)-headerSize > w.spec.MaxFrame {
		*bp = buf[:0]
		bufPool.Put(bp)
		w.forget(id)
		w.release()
		return 0, fmt.Errorf("call of %d bytes: %w (%d)", len(buf)-headerSize, errFrameTooLarge, w.spec.MaxFrame)
	}
	w.wmu.Lock()
	_, err := w.conn.Write(buf)
	w.wmu.Unlock()
	if cap(buf) <= 64<<10 {
		*bp = buf[:0]
		bufPool.Put(bp)
	}
	if err != nil {
		// The socket only fails when the process is gone or going: answer
		// with how it ended.
		if w.forget(id) {
			w.release()
			return 0, w.deathErr()
		}
		r := <-p.ch // wait() answered the call already
		return 0, r.err
	}
	return id, nil
}

// abandon cancels a call its caller gave up on; the slot is released when
// Python answers. A call still running CancelGrace later is reported to
// OnCancelIgnored.
func (w *Worker) abandon(id uint64, tool string) {
	w.cancel(id)
	if w.spec.CancelGrace > 0 && w.spec.OnCancelIgnored != nil {
		time.AfterFunc(w.spec.CancelGrace, func() {
			w.mu.Lock()
			_, still := w.pending[id]
			w.mu.Unlock()
			if still {
				w.log.Warn().Uint64("call", id).Str("tool", tool).Dur("cancel_grace", w.spec.CancelGrace).Msg("cancelled call still running")
				w.spec.OnCancelIgnored(w)
			}
		})
	}
}

// CancelAll cancels every call in flight in Python (the same as each
// caller going away) and returns how many there were.
func (w *Worker) CancelAll() int {
	w.mu.Lock()
	ids := make([]uint64, 0, len(w.pending))
	for id := range w.pending {
		ids = append(ids, id)
	}
	w.mu.Unlock()
	for _, id := range ids {
		w.cancel(id)
	}
	return len(ids)
}

// credit lets a stream send n more chunks.
func (w *Worker) credit(id uint64, n int) {
	var b [headerSize + 4]byte
	putHeader(b[:], frameCredit, id, 4)
	binary.LittleEndian.PutUint32(b[headerSize:], uint32(n))
	w.ctlMu.Lock()
	_, _ = w.ctl.Write(b[:])
	w.ctlMu.Unlock()
}

// CloseSession drops a session's state in the worker. It is ordered with
// calls: a call sent before it still sees the state.
func (w *Worker) CloseSession(sessionID string) error {
	if len(sessionID) > maxCallField {
		return fmt.Errorf("session id longer than %d bytes", maxCallField)
	}
	buf := appendFrame(make([]byte, 0, headerSize+len(sessionID)), frameCloseSession, 0, []byte(sessionID))
	w.wmu.Lock()
	_, err := w.conn.Write(buf)
	w.wmu.Unlock()
	return err
}

// deathErr waits (briefly) for the process to be gone and returns how it
// ended; a worker that is stopping but not yet gone answers ErrNotReady.
func (w *Worker) deathErr() error {
	t := time.NewTimer(time.Second)
	defer t.Stop()
	select {
	case <-w.done:
	case <-t.C:
		w.mu.Lock()
		defer w.mu.Unlock()
		if w.exitErr != nil {
			return w.exitErr
		}
		return ErrNotReady
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.exitErr
}

// forget drops a pending call that was never answered; it reports whether the
// call was still pending.
func (w *Worker) forget(id uint64) bool {
	w.mu.Lock()
	_, ok := w.pending[id]
	delete(w.pending, id)
	w.mu.Unlock()
	return ok
}

func (w *Worker) cancel(id uint64) {
	var h [headerSize]byte
	putHeader(h[:], frameCancel, id, 0)
	w.ctlMu.Lock()
	_, _ = w.ctl.Write(h[:])
	w.ctlMu.Unlock()
}

// Ping sends a heartbeat; the answer updates LastPong.
func (w *Worker) Ping() error {
	var h [headerSize]byte
	putHeader(h[:], framePing, 0, 0)
	w.ctlMu.Lock()
	_, err := w.ctl.Write(h[:])
	w.ctlMu.Unlock()
	return err
}

// LastPong returns when the worker last answered a heartbeat (its start time
// before the first answer).
func (w *Worker) LastPong() time.Time { return time.Unix(0, w.lastPong.Load()) }

// Hang kills a worker that stopped answering heartbeats; its calls fail with
// an *ExitError whose Cause is CauseHung.
func (w *Worker) Hang(err error) { w.fatal(CauseHung, err) }

// Stop asks the worker to exit by closing the protocol socket (Python exits
// on end of file), then escalates: SIGTERM to its process group after grace,
// SIGKILL after another grace. It returns when the process is gone. Calls in
// flight fail with an *ExitError whose Cause is CauseStopped. Safe to call
// more than once and concurrently.
func (w *Worker) Stop(grace time.Duration) {
	w.stopping.Store(true)
	w.state.Store(int32(StateStopping))
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
	w.conn.Close()
	w.ctl.Close()
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-w.done:
		return
	case <-t.C:
	}
	w.log.Warn().Dur("grace", grace).Msg("worker ignored close, sending SIGTERM")
	_ = killGroup(w.pid, syscall.SIGTERM)
	t.Reset(grace)
	select {
	case <-w.done:
		return
	case <-t.C:
	}
	w.log.Warn().Dur("grace", grace).Msg("worker ignored SIGTERM, sending SIGKILL")
	w.Kill()
	<-w.done
}

// Kill sends SIGKILL to the worker's whole process group.
func (w *Worker) Kill() {
	_ = killGroup(w.pid, syscall.SIGKILL)
}

// Exited is closed as soon as the process has exited, before its last
// output is drained and its calls are failed (then Done closes).
func (w *Worker) Exited() <-chan struct{} { return w.exited }

// Done is closed once the process has exited and its calls were failed.
func (w *Worker) Done() <-chan struct{} { return w.done }

// Err returns how the process ended (an *ExitError), or nil while it runs.
func (w *Worker) Err() error {
	select {
	case <-w.done:
	default:
		return nil
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.exitErr
}

// ID returns the worker's slot in its pool.
func (w *Worker) ID() ID { return w.spec.ID }

// Generation returns the worker's generation.
func (w *Worker) Generation() Generation { return w.spec.Generation }

// StartTicks returns the process start time in clock ticks since boot.
func (w *Worker) StartTicks() uint64 { return w.startTicks }

// PID returns the process id; it is also the id of the worker's process
// group.
func (w *Worker) PID() int { return w.pid }

// Capacity returns how many calls the worker runs at once.
func (w *Worker) Capacity() int { return w.spec.Capacity }

// Started returns when the process was spawned.
func (w *Worker) Started() time.Time { return w.started }

// Served returns how many calls the worker has answered.
func (w *Worker) Served() uint64 { return w.served.Load() }

// State returns the worker's state.
func (w *Worker) State() State { return State(w.state.Load()) }

// Hello returns the handshake (valid once Start returned).
func (w *Worker) Hello() Hello { return w.hello }

// Pool returns the name of the worker's pool.
func (w *Worker) Pool() string { return w.spec.Pool }
