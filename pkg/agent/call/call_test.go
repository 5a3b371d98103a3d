package call_test

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/snakepit/snakepit/pkg/agent/call"
)

// The one table: every error of the vocabulary says whether its call ran.
func TestFateOf(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want call.Fate
	}{
		{"nil", nil, call.Ran},
		{"context", context.Canceled, call.Ran},
		{"queue full", &call.QueueFullError{Pool: "p"}, call.Movable},
		{"spilled, wrapped", fmt.Errorf("attempt: %w", &call.QueueFullError{Spilled: true}), call.Movable},
		{"queue timeout", &call.QueueTimeoutError{}, call.Movable},
		{"draining", call.ErrDraining, call.Movable},
		{"cordoned", call.ErrCordoned, call.Movable},
		{"shutting down", call.ErrShuttingDown, call.Movable},
		{"pool unavailable", &call.PoolUnavailableError{Pool: "p", State: "failed"}, call.Movable},
		{"unknown pool", &call.UnknownPoolError{Pool: "p"}, call.Movable},
		{"peer unavailable", &call.PeerUnavailableError{Node: "b", Err: errors.New("open")}, call.Movable},
		{"unknown tool", &call.UnknownToolError{}, call.Refused},
		{"invalid argument", &call.InvalidArgumentError{Field: "args"}, call.Refused},
		{"deadline while queued", &call.DeadlineError{Stage: call.StageQueued}, call.Refused},
		{"deadline while running", &call.DeadlineError{Stage: call.StageRunning}, call.Ran},
		{"session lost", &call.SessionLostError{}, call.Refused},
		{"may have executed", &call.MayHaveExecutedError{Err: errors.New("reset")}, call.Ran},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := call.FateOf(tt.err); got != tt.want {
				t.Errorf("FateOf(%v) = %d, want %d", tt.err, got, tt.want)
			}
			if got, want := call.NotExecuted(tt.err), tt.want != call.Ran; got != want {
				t.Errorf("NotExecuted(%v) = %v, want %v", tt.err, got, want)
			}
		})
	}
	if !errors.Is(&call.DeadlineError{}, context.DeadlineExceeded) {
		t.Error("a DeadlineError is not context.DeadlineExceeded")
	}
	if got := call.FateOfReason(call.ReasonQueueFull, ""); got != call.Movable {
		t.Errorf("FateOfReason(QUEUE_FULL) = %d, want Movable (a peer's answer reads the same table)", got)
	}
}

func TestRequestCheck(t *testing.T) {
	for _, tt := range []struct {
		name string
		req  call.Request
		bad  string
	}{
		{"no tool", call.Request{}, "tool"},
		{"args an array", call.Request{Tool: "t", Args: []byte("[1]")}, "args"},
		{"args not JSON", call.Request{Tool: "t", Args: []byte("{x")}, "args"},
		{"long session id", call.Request{Tool: "t", SessionID: string(make([]byte, call.MaxIDLen+1))}, "session_id/request_id"},
		{"fine", call.Request{Tool: "t", Args: []byte(` {"a": 1}`)}, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.req.Check()
			var iae *call.InvalidArgumentError
			switch {
			case tt.bad == "" && err != nil:
				t.Fatalf("Check() = %v, want nil", err)
			case tt.bad != "" && (!errors.As(err, &iae) || iae.Field != tt.bad):
				t.Fatalf("Check() = %v, want an invalid %s", err, tt.bad)
			}
		})
	}
}
