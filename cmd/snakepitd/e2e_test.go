package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/snakepit/snakepit/pkg/client"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// buildBinaries builds snakepitd and spctl as a user would.
func buildBinaries(t *testing.T) (daemon, ctl string) {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-o", dir+"/", "../../cmd/snakepitd", "../../cmd/spctl")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return filepath.Join(dir, "snakepitd"), filepath.Join(dir, "spctl")
}

// readmeBlock returns the fenced code between <!-- name:begin --> and
// <!-- name:end --> in README.md.
func readmeBlock(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile("(?s)<!-- " + name + ":begin -->\\s*```[a-z]*\\n(.*?)```\\s*<!-- " + name + ":end -->")
	m := re.FindSubmatch(b)
	if m == nil {
		t.Fatalf("README.md has no %s block", name)
	}
	return string(m[1])
}

type daemonProc struct {
	cmd    *exec.Cmd
	addr   string
	stderr *bytes.Buffer
	out    *lockedWriter // stderr's writer: read it through out.String
	exited chan error
}

func startDaemon(t *testing.T, bin, dir string, args ...string) *daemonProc {
	t.Helper()
	return startDaemonEnv(t, bin, dir, nil, args...)
}

// startDaemonEnv is startDaemon with extra environment variables for the
// daemon (and so its workers).
func startDaemonEnv(t *testing.T, bin, dir string, env []string, args ...string) *daemonProc {
	t.Helper()
	listenFile := filepath.Join(dir, "addr")
	_ = os.Remove(listenFile) // left by an earlier run in the same dir
	cmd := exec.Command(bin, append([]string{"--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--state-dir", filepath.Join(dir, "state"),
		"--listen-file", listenFile, "--log-format", "json"}, args...)...)
	cmd.Dir = dir
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	var stderr bytes.Buffer
	out := &lockedWriter{w: &stderr}
	cmd.Stderr = out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d := &daemonProc{cmd: cmd, stderr: &stderr, out: out, exited: make(chan error, 1)}
	go func() { d.exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-d.exited
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		if b, err := os.ReadFile(listenFile); err == nil && bytes.HasSuffix(b, []byte("\n")) {
			d.addr = strings.TrimSpace(string(b))
			return d
		}
		select {
		case err := <-d.exited:
			d.exited <- err
			return d
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("snakepitd did not listen within 60s; stderr:\n%s", stderr.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func waitServing(t *testing.T, c *client.Conn) {
	t.Helper()
	hc := healthpb.NewHealthClient(c)
	deadline := time.Now().Add(60 * time.Second)
	for {
		r, err := hc.Check(context.Background(), &healthpb.HealthCheckRequest{Service: "snakepit.v1.Snakepit"})
		if err == nil && r.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("node not SERVING within 60s: %v %v", r, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestBinaryServesReadmeAdapter does what the README tells a new user: write
// the adapter and config shown there, start the daemon with it, call the
// tool with spctl and over gRPC, stop the daemon with SIGTERM.
func TestBinaryServesReadmeAdapter(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binaries")
	}
	daemon, ctl := buildBinaries(t)
	dir := t.TempDir()
	adapter := readmeBlock(t, "adapter")
	if n := strings.Count(strings.TrimSpace(adapter), "\n") + 1; n >= 10 {
		t.Errorf("the README's adapter has %d lines; it should stay under ten", n)
	}
	if err := os.WriteFile(filepath.Join(dir, "my_tools.py"), []byte(adapter), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "my.yaml"), []byte(readmeBlock(t, "config")), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, daemon, dir, "--config", "my.yaml")
	c, err := client.Dial(d.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	waitServing(t, c)

	out, err := exec.Command(ctl, "--addr", d.addr, "exec", "greet", "--args", `{"name": "ada"}`).Output()
	if err != nil || strings.TrimSpace(string(out)) != `"hello, ada!"` {
		t.Fatalf("spctl exec greet = %q, %v; want \"hello, ada!\"", out, err)
	}
	resp, err := c.Snakepit.Execute(context.Background(), &snakepitv1.ExecuteRequest{Tool: "greet", Args: []byte(`{"name":"bob","punctuation":"?"}`)})
	if err != nil || string(resp.GetResult()) != `"hello, bob?"` {
		t.Fatalf("Execute greet = %v, %v", resp, err)
	}
	// spctl reports a server error with its message and a non-zero status.
	var stderr bytes.Buffer
	cmd := exec.Command(ctl, "--addr", d.addr, "exec", "nope")
	cmd.Stderr = &stderr
	err = cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(stderr.String(), `has no tool "nope"`) || !strings.Contains(stderr.String(), "greet") {
		t.Fatalf("spctl exec nope: %v, stderr %q; want exit 1 and the node's message", err, stderr.String())
	}
	out, err = exec.Command(ctl, "--addr", d.addr, "tools").Output()
	if err != nil || !strings.Contains(string(out), "greet") || !strings.Contains(string(out), "name: str") {
		t.Fatalf("spctl tools = %q, %v", out, err)
	}

	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-d.exited:
		if err != nil {
			t.Fatalf("snakepitd exited with %v after SIGTERM, want status 0; stderr:\n%s", err, d.stderr.String())
		}
		d.exited <- err
	case <-time.After(60 * time.Second):
		t.Fatal("snakepitd did not stop within 60s of SIGTERM")
	}
	// Start-up, calls and shutdown logged well-formed lines.
	checkLogKeys(t, "snakepitd", d)
}

// TestBinaryBrokenAdapterExits: an adapter that does not import makes the
// daemon exit non-zero with the Python traceback, never hang.
func TestBinaryBrokenAdapterExits(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binaries")
	}
	daemon, _ := buildBinaries(t)
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "bad.py"), []byte("from snakepit import tool\nraise RuntimeError('cannot load the model')\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "bad.yaml"), []byte("pools:\n  - name: models\n    adapter: ./bad.py\n"), 0o644)
	d := startDaemon(t, daemon, dir, "--config", "bad.yaml")
	select {
	case err := <-d.exited:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() == 0 {
			t.Fatalf("exit = %v, want non-zero", err)
		}
		s := d.stderr.String()
		for _, want := range []string{`pool \"models\"`, "cannot load the model", "bad.py"} {
			if !strings.Contains(s, want) {
				t.Errorf("stderr does not mention %s:\n%s", want, s)
			}
		}
		d.exited <- err
	case <-time.After(60 * time.Second):
		t.Fatal("snakepitd with a broken adapter did not exit within 60s")
	}
}

func TestVersion(t *testing.T) {
	var out bytes.Buffer
	if code := run(context.Background(), []string{"version"}, &out, &out); code != 0 || strings.TrimSpace(out.String()) == "" {
		t.Fatalf("snakepitd version = %d %q", code, out.String())
	}
}
