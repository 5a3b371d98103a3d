package worker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

func TestStreamDeliversItemsInOrder(t *testing.T) {
	w := misbehave(t, 1)
	var got []string
	res, err := w.Stream(context.Background(), &Call{Tool: "counter", Args: []byte(`{"n": 1000}`)}, 8, func(b []byte) error {
		got = append(got, string(b))
		return nil
	})
	if err != nil || string(res) != `"done"` {
		t.Fatalf("Stream = %s, %v; want \"done\"", res, err)
	}
	if len(got) != 1000 || got[0] != "0" || got[999] != "999" {
		t.Fatalf("got %d chunks (%v...), want 0..999 in order", len(got), got[:min(3, len(got))])
	}
	for i, g := range got {
		if g != strconv.Itoa(i) {
			t.Fatalf("chunk %d = %s", i, g)
		}
	}
}

func TestAsyncGeneratorStreams(t *testing.T) {
	w := misbehave(t, 1)
	n := 0
	_, err := w.Stream(context.Background(), &Call{Tool: "async_counter", Args: []byte(`{"n": 5}`)}, 2, func(b []byte) error {
		if string(b) != fmt.Sprintf(`{"i":%d}`, n) {
			return fmt.Errorf("chunk %d = %s", n, b)
		}
		n++
		return nil
	})
	if err != nil || n != 5 {
		t.Fatalf("async stream: %d chunks, %v", n, err)
	}
}

func TestStreamErrorAfterChunks(t *testing.T) {
	w := misbehave(t, 1)
	n := 0
	_, err := w.Stream(context.Background(), &Call{Tool: "failing_stream", Args: []byte(`{"n": 3}`)}, 4, func([]byte) error { n++; return nil })
	var te *ToolError
	if n != 3 || !errors.As(err, &te) || te.Type != "ValueError" || te.Message != "broke after 3" {
		t.Fatalf("got %d chunks and %v, want 3 chunks then the ValueError", n, err)
	}
	// The worker is fine.
	if _, err := w.Call(context.Background(), &Call{Tool: "noop"}); err != nil {
		t.Fatal(err)
	}
}

func TestStreamToolNeedsStreamCall(t *testing.T) {
	w := misbehave(t, 1)
	_, err := w.Call(context.Background(), &Call{Tool: "counter", Args: []byte(`{"n": 3}`)})
	var te *ToolError
	if !errors.As(err, &te) || te.Kind != KindStreamRequired {
		t.Fatalf("Call(counter) = %v, want a stream_required error", err)
	}
}

func TestSlowConsumerBoundsTheGenerator(t *testing.T) {
	w := misbehave(t, 1)
	marker := filepath.Join(t.TempDir(), "m")
	const window = 4
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	block := make(chan struct{})
	seen := 0
	done := make(chan error, 1)
	go func() {
		_, err := w.Stream(ctx, &Call{Tool: "endless", Args: []byte(fmt.Sprintf(`{"marker": %q}`, marker))}, window, func([]byte) error {
			seen++
			if seen == 10 {
				<-block // the client stops reading
			}
			return nil
		})
		done <- err
	}()
	// The consumer is stuck in its 10th chunk, having acknowledged 8 (credit
	// goes back every window/2). Python may send window+8 = 12 chunks in all,
	// so exactly 2 wait in the daemon's buffer; a 13th would break the
	// protocol and get the worker killed.
	waitFor(t, func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		for _, p := range w.pending {
			return len(p.chunks) == 2
		}
		return false
	})
	if w.Err() != nil {
		t.Fatalf("worker died: %v", w.Err())
	}
	cancel()
	close(block)
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Stream after cancel = %v", err)
	}
	waitFor(t, func() bool { b, _ := os.ReadFile(marker); return string(b) == "Cancelled" })
}

func TestCancelStopsGenerator(t *testing.T) {
	w := misbehave(t, 1)
	marker := filepath.Join(t.TempDir(), "m")
	ctx, cancel := context.WithCancel(context.Background())
	n := 0
	_, err := w.Stream(ctx, &Call{Tool: "endless", Args: []byte(fmt.Sprintf(`{"marker": %q}`, marker))}, 16, func([]byte) error {
		if n++; n == 100 {
			cancel()
		}
		return nil
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Stream = %v, want context.Canceled", err)
	}
	waitFor(t, func() bool { b, _ := os.ReadFile(marker); return string(b) == "Cancelled" })
	waitFor(t, func() bool { w.mu.Lock(); defer w.mu.Unlock(); return len(w.pending) == 0 })
	if _, err := w.Call(context.Background(), &Call{Tool: "noop"}); err != nil {
		t.Fatalf("after a cancelled stream: %v", err)
	}
}

func TestSessionStoreLivesInWorker(t *testing.T) {
	w := misbehave(t, 1)
	call := func(c *Call) string {
		t.Helper()
		b, err := w.Call(context.Background(), c)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if got := call(&Call{Tool: "remember", Args: []byte(`{"key":"a","value":1}`), SessionID: "s1"}); got != `{"a":1}` {
		t.Fatalf("first call = %s", got)
	}
	if got := call(&Call{Tool: "remember", Args: []byte(`{"key":"b","value":2}`), SessionID: "s1"}); got != `{"a":1,"b":2}` {
		t.Fatalf("second call = %s, want the state of the first", got)
	}
	if got := call(&Call{Tool: "remember", SessionID: "s2"}); got != `{}` {
		t.Fatalf("other session = %s, want its own empty state", got)
	}
	if got := call(&Call{Tool: "remember", SessionID: "s1", SessionTransient: true}); got != `{}` {
		t.Fatalf("transient call = %s, want an empty store", got)
	}
	if got := call(&Call{Tool: "remember"}); got != `null` {
		t.Fatalf("sessionless call = %s, want no store", got)
	}
	if err := w.CloseSession("s1"); err != nil {
		t.Fatal(err)
	}
	if got := call(&Call{Tool: "remember", SessionID: "s1"}); got != `{}` {
		t.Fatalf("after CloseSession = %s, want the state gone", got)
	}
}
