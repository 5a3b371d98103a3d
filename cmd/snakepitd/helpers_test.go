package main

import (
	"io"
	"sync"
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
