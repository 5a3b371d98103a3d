package main

import (
	"fmt"
	"io"
	"os/exec"
	"sync"
	"testing"
)

// lockedWriter makes a writer safe for the concurrent writes of a child
// process's output copier and the test reading it.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func fmtConfig(format string, args ...any) string { return fmt.Sprintf(format, args...) }

// startBystander starts a process that is none of the daemon's.
func startBystander(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("sleep", "300")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return cmd.Process.Pid
}
