package worker

import (
	"errors"
	"fmt"
	"strings"
	"syscall"
)

// ErrNotReady reports a call to a worker that is not (or no longer) serving.
var ErrNotReady = errors.New("worker not ready")

// ExitError describes how a worker process ended. Calls in flight on a worker
// that exits fail with it.
type ExitError struct {
	Pool       string
	ID         ID
	Generation Generation
	PID        int
	// Code is the exit status, or -1 when a signal ended the process.
	Code int
	// Signal is the signal that ended the process, or 0.
	Signal syscall.Signal
	// Cause classifies the exit: see the Cause* constants.
	Cause string
	// StderrTail holds the last lines the process wrote to stderr.
	StderrTail []string
}

// Causes of a worker's exit, as ExitError.Cause reports them.
const (
	CauseExited   = "exited"    // exited on its own with status 0
	CauseExitCode = "exit_code" // exited on its own with a non-zero status
	CauseSignal   = "signal"    // killed by a signal (not one below)
	CauseKilled   = "killed"    // SIGKILL not sent by the daemon: often the OOM killer
	CauseOOM      = "oom"       // the last stderr lines show a MemoryError
	CauseSegfault = "segfault"  // SIGSEGV or SIGBUS
	CauseAbort    = "abort"     // SIGABRT (an assertion in native code)
	CauseCUDA     = "cuda"      // the last stderr lines show a CUDA error
	CauseStopped  = "stopped"   // the daemon stopped it (recycle, shutdown)
	CauseProtocol = "protocol"  // it broke the framed protocol and was killed
	CauseHung     = "hung"      // it missed heartbeats and was killed
)

func (e *ExitError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "worker %d generation %d of pool %q (pid %d) ", e.ID, e.Generation, e.Pool, e.PID)
	switch {
	case e.Signal != 0:
		fmt.Fprintf(&b, "was killed by %s", signalName(e.Signal))
	default:
		fmt.Fprintf(&b, "exited with status %d", e.Code)
	}
	fmt.Fprintf(&b, " (cause: %s)", e.Cause)
	if n := len(e.StderrTail); n > 0 {
		fmt.Fprintf(&b, "; last stderr: %s", e.StderrTail[n-1])
	}
	return b.String()
}

func signalName(s syscall.Signal) string {
	switch s {
	case syscall.SIGKILL:
		return "SIGKILL"
	case syscall.SIGTERM:
		return "SIGTERM"
	case syscall.SIGSEGV:
		return "SIGSEGV"
	case syscall.SIGABRT:
		return "SIGABRT"
	case syscall.SIGBUS:
		return "SIGBUS"
	case syscall.SIGINT:
		return "SIGINT"
	}
	return fmt.Sprintf("signal %d (%s)", int(s), s.String())
}

// classify names the cause of an exit from its status and the last stderr
// lines. stopped is true when the daemon itself ended the process.
func classify(code int, sig syscall.Signal, tail []string, stopped bool) string {
	if stopped {
		return CauseStopped
	}
	for i := len(tail) - 1; i >= 0 && i >= len(tail)-20; i-- {
		l := tail[i]
		if strings.Contains(l, "CUDA error") || strings.Contains(l, "CUDA out of memory") ||
			strings.Contains(l, "cudaError") || strings.Contains(l, "CUBLAS_STATUS") {
			return CauseCUDA
		}
	}
	for i := len(tail) - 1; i >= 0 && i >= len(tail)-20; i-- {
		if strings.Contains(tail[i], "MemoryError") {
			return CauseOOM
		}
	}
	switch sig {
	case 0:
		if code == 0 {
			return CauseExited
		}
		return CauseExitCode
	case syscall.SIGSEGV, syscall.SIGBUS:
		return CauseSegfault
	case syscall.SIGABRT:
		return CauseAbort
	case syscall.SIGKILL:
		return CauseKilled
	}
	return CauseSignal
}

// StartError reports a worker that failed before it was ready: the adapter
// did not import, its setup raised, or the interpreter is missing.
type StartError struct {
	Pool    string
	Adapter string
	// Type, Message and Traceback describe the Python exception, when there
	// was one.
	Type      string
	Message   string
	Traceback string
	// Err is the underlying error when there was no Python exception.
	Err error
}

func (e *StartError) Error() string {
	if e.Type != "" {
		return fmt.Sprintf("pool %q: adapter %q failed to load: %s: %s", e.Pool, e.Adapter, e.Type, e.Message)
	}
	return fmt.Sprintf("pool %q: worker for adapter %q failed to start: %v", e.Pool, e.Adapter, e.Err)
}

func (e *StartError) Unwrap() error { return e.Err }

// ToolError is an error the Python side reported for one call. The worker
// stays healthy after it.
type ToolError struct {
	// Kind is what went wrong: see the Kind* constants.
	Kind      string `json:"kind"`
	Type      string `json:"type"`
	Message   string `json:"message"`
	Traceback string `json:"traceback"`
}

// Kinds of ToolError.
const (
	KindException      = "exception"       // the tool raised
	KindInvalidArgs    = "invalid_args"    // the args did not fit the tool
	KindEncode         = "encode"          // the result is not JSON-encodable
	KindUnknownTool    = "unknown_tool"    // the adapter has no such tool
	KindCancelled      = "cancelled"       // the tool noticed the cancellation
	KindTooLarge       = "too_large"       // the result is over the maximum size
	KindStreamRequired = "stream_required" // a generator tool called without a stream
	KindInternal       = "internal"        // the runtime itself failed
)

func (e *ToolError) Error() string {
	if e.Type != "" {
		return fmt.Sprintf("%s: %s", e.Type, e.Message)
	}
	return e.Message
}
