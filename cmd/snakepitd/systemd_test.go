package main

import (
	"bufio"
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/snakepit/snakepit/pkg/agent"
)

func unitKeys(t *testing.T) map[string]string {
	t.Helper()
	f, err := os.Open("../../deploy/systemd/snakepitd.service")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	keys := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if k, v, ok := strings.Cut(l, "="); ok && !strings.HasPrefix(l, "#") {
			keys[k] = v
		}
	}
	return keys
}

// The unit states the lifecycle the daemon implements, and its stop timeout
// covers the longest clean stop the defaults allow.
func TestSystemdUnit(t *testing.T) {
	k := unitKeys(t)
	for key, want := range map[string]string{
		"Type": "notify", "Restart": "on-failure", "KillMode": "control-group",
		"StateDirectory": "snakepitd", "RuntimeDirectory": "snakepitd",
	} {
		if k[key] != want {
			t.Errorf("%s=%q, want %q", key, k[key], want)
		}
	}
	stop, err := time.ParseDuration(k["TimeoutStopSec"])
	if err != nil {
		t.Fatalf("TimeoutStopSec=%q: %v", k["TimeoutStopSec"], err)
	}
	need := agent.DefaultShutdownGrace + 2*agent.DefaultStopGrace
	if stop <= need {
		t.Errorf("TimeoutStopSec=%s must exceed shutdown_grace + 2 x stop_grace = %s", stop, need)
	}
	if _, ok := k["PrivateDevices"]; ok {
		t.Error("PrivateDevices would hide the GPUs from the workers")
	}
}

// snakepitd tells systemd READY=1 once serving and STOPPING=1 on stop,
// over $NOTIFY_SOCKET.
func TestSdNotify(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "c.yaml")
	os.WriteFile(cfg, []byte("pools:\n  - name: default\n    adapter: snakepit_examples.example\n    size: 1\nmetrics_listen: \"off\"\n"), 0o644)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"--config", cfg, "--listen", "127.0.0.1:0", "--state-dir", dir, "--log-level", "error"}, os.Stdout, os.Stderr)
	}()
	read := func() string {
		conn.SetReadDeadline(time.Now().Add(60 * time.Second))
		buf := make([]byte, 256)
		n, err := conn.Read(buf)
		if err != nil {
			t.Fatalf("no notification: %v", err)
		}
		return string(buf[:n])
	}
	if got := read(); got != "READY=1" {
		t.Fatalf("first notification %q, want READY=1", got)
	}
	cancel()
	if got := read(); got != "STOPPING=1" {
		t.Fatalf("second notification %q, want STOPPING=1", got)
	}
	if code := <-done; code != 0 {
		t.Fatalf("exit %d after a clean stop", code)
	}
}
