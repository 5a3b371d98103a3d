package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

// ErrShuttingDown reports a call that arrived while the node is stopping.
var ErrShuttingDown = errors.New("node is shutting down")

// UnknownPoolError reports a request for a pool the node does not have.
type UnknownPoolError struct {
	Pool  string
	Known []string
}

func (e *UnknownPoolError) Error() string {
	return fmt.Sprintf("no pool %q on this node (pools: %s)", e.Pool, strings.Join(e.Known, ", "))
}

// UnknownToolError reports a request for a tool its pool does not serve.
type UnknownToolError struct {
	Pool  string
	Tool  string
	Known []string
}

func (e *UnknownToolError) Error() string {
	return fmt.Sprintf("pool %q has no tool %q (tools: %s)", e.Pool, e.Tool, strings.Join(e.Known, ", "))
}

// InvalidArgumentError reports a bad request field.
type InvalidArgumentError struct {
	Field  string
	Reason string
}

func (e *InvalidArgumentError) Error() string {
	return fmt.Sprintf("invalid %s: %s", e.Field, e.Reason)
}

// QueueFullError reports a call refused because its pool's queue is full.
// The call was not executed.
type QueueFullError struct {
	Pool       string
	Depth      int
	RetryAfter time.Duration
}

func (e *QueueFullError) Error() string {
	return fmt.Sprintf("pool %q is saturated: all workers busy and %d calls queued (queue_depth); not executed, retry after %s", e.Pool, e.Depth, e.RetryAfter)
}

// QueueTimeoutError reports a call that waited queue_max_wait for a worker
// without getting one. The call was not executed.
type QueueTimeoutError struct {
	Pool       string
	Waited     time.Duration
	RetryAfter time.Duration
}

func (e *QueueTimeoutError) Error() string {
	return fmt.Sprintf("pool %q: no worker free within queue_max_wait (%s); not executed, retry after %s", e.Pool, e.Waited.Round(time.Millisecond), e.RetryAfter)
}

// Stages of a call, as DeadlineError reports where the time went.
const (
	StageQueued  = "queued"
	StageRunning = "running"
)

// DeadlineError reports a call whose deadline passed, and where its time
// went.
type DeadlineError struct {
	Pool   string
	Stage  string
	Queued time.Duration
	Ran    time.Duration
}

func (e *DeadlineError) Error() string {
	if e.Stage == StageQueued {
		return fmt.Sprintf("deadline exceeded after %s queued in pool %q, before any worker ran the call", e.Queued.Round(time.Microsecond), e.Pool)
	}
	return fmt.Sprintf("deadline exceeded after %s queued and %s running in pool %q (the call was cancelled in Python)", e.Queued.Round(time.Microsecond), e.Ran.Round(time.Microsecond), e.Pool)
}

// Is makes errors.Is(err, context.DeadlineExceeded) hold.
func (e *DeadlineError) Is(target error) bool { return target == context.DeadlineExceeded }

// PoolUnavailableError reports a pool that has no worker able to serve.
type PoolUnavailableError struct {
	Pool   string
	State  string
	Reason string
}

func (e *PoolUnavailableError) Error() string {
	if e.Reason == "" {
		return fmt.Sprintf("pool %q is %s: no worker can take the call", e.Pool, e.State)
	}
	return fmt.Sprintf("pool %q is %s: %s", e.Pool, e.State, e.Reason)
}
