package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
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

// String returns what was written so far (w must be a *bytes.Buffer).
func (l *lockedWriter) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.(*bytes.Buffer).String()
}

// metricsAddr returns the metrics address a daemon logged ("serving
// metrics"), waiting for the line.
func (d *daemonProc) metricsAddr(t *testing.T) string {
	t.Helper()
	re := regexp.MustCompile(`"metrics_listen":"([^"]+)"`)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if m := re.FindStringSubmatch(d.out.String()); m != nil {
			return m[1]
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon logged no metrics address within 30s:\n%s", d.out.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// scrapeMetric returns the value of one sample (name{labels}, labels as
// the exposition format prints them) from the daemon's /metrics; 0 when
// the sample is absent.
func (d *daemonProc) scrapeMetric(t *testing.T, name, labels string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + d.metricsAddr(t) + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile("(?m)^" + regexp.QuoteMeta(name+"{"+labels+"}") + ` ([0-9.e+-]+)$`)
	m := re.FindSubmatch(b)
	if m == nil {
		return 0
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// lastLines returns the last n lines of s.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
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

// checkLogKeys fails the test if a JSON log line of the daemon repeats a
// top-level key (log processors keep one of the two, at random) or is not
// a JSON object. It returns how many lines it checked.
func checkLogKeys(t *testing.T, name string, d *daemonProc) int {
	t.Helper()
	n := 0
	for line := range strings.Lines(d.out.String()) {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		n++
		dec := json.NewDecoder(strings.NewReader(line))
		if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
			t.Errorf("%s: log line is not a JSON object: %s", name, line)
			continue
		}
		seen := map[string]bool{}
		for dec.More() {
			tok, err := dec.Token()
			if err != nil {
				t.Errorf("%s: bad log line: %v: %s", name, err, line)
				break
			}
			key := tok.(string)
			if seen[key] {
				t.Errorf("%s: log line repeats the key %q: %s", name, key, line)
			}
			seen[key] = true
			var skip json.RawMessage
			if err := dec.Decode(&skip); err != nil {
				t.Errorf("%s: bad log line: %v: %s", name, err, line)
				break
			}
		}
	}
	return n
}
