package main

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/snakepit/snakepit/pkg/client"
	"github.com/snakepit/snakepit/pkg/worker"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

const orphanConfig = `pools:
  - name: term
    adapter: %s
    size: 1
    stop_grace: 500ms
  - name: fork
    adapter: %s
    size: 1
    stop_grace: 500ms
`

func gone(pid int) bool {
	st, err := worker.ReadProcStat(pid)
	return err != nil || !st.Alive()
}

func waitGone(t *testing.T, what string, pid int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !gone(pid) {
		if time.Now().After(deadline) {
			t.Fatalf("%s (pid %d) still runs", what, pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// leaveOrphans starts a daemon in dir and has its workers fork a grandchild
// and ignore SIGTERM; it returns the daemon, the grandchild's pid and the
// SIGTERM-ignoring worker's pid.
func leaveOrphans(t *testing.T, bin, dir string) (*daemonProc, int, int) {
	t.Helper()
	adapter, _ := filepath.Abs("testdata/orphans.py")
	cfg := filepath.Join(dir, "orphans.yaml")
	if err := os.WriteFile(cfg, []byte(fmtConfig(orphanConfig, adapter, adapter)), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, bin, dir, "--config", cfg)
	c, err := client.Dial(d.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	waitServing(t, c)
	call := func(pool, tool string) int {
		resp, err := c.Snakepit.Execute(context.Background(), &snakepitv1.ExecuteRequest{Pool: pool, Tool: tool})
		if err != nil {
			t.Fatalf("%s: %v", tool, err)
		}
		pid, err := strconv.Atoi(string(resp.GetResult()))
		if err != nil {
			t.Fatal(err)
		}
		return pid
	}
	return d, call("fork", "spawn_sleeper"), call("term", "ignore_term")
}

func TestNoOrphansAfterSigterm(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binaries")
	}
	bin, _ := buildBinaries(t)
	dir := t.TempDir()
	d, grandchild, stubborn := leaveOrphans(t, bin, dir)
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-d.exited:
		d.exited <- err
		if err != nil {
			t.Fatalf("snakepitd exit after SIGTERM = %v, want 0", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("snakepitd did not stop")
	}
	waitGone(t, "the SIGTERM-ignoring worker", stubborn)
	waitGone(t, "the grandchild", grandchild)
}

func TestNoOrphansAfterSigkillAndRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binaries")
	}
	bin, _ := buildBinaries(t)
	dir := t.TempDir()
	d, grandchild, stubborn := leaveOrphans(t, bin, dir)
	t.Cleanup(func() { _ = syscall.Kill(grandchild, syscall.SIGKILL) })
	if err := d.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	err := <-d.exited
	d.exited <- err
	// The workers die with the daemon (parent-death signal)...
	waitGone(t, "the SIGTERM-ignoring worker", stubborn)
	// ...but a grandchild does not: only the next run can clean it up.
	if gone(grandchild) {
		t.Fatalf("the grandchild %d died with the daemon; this test needs it to survive", grandchild)
	}
	// An unrelated process must survive the sweep.
	bystander := startBystander(t)
	d2 := startDaemon(t, bin, dir, "--config", filepath.Join(dir, "orphans.yaml"))
	c, err := client.Dial(d2.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	waitServing(t, c)
	waitGone(t, "the grandchild left by the killed run", grandchild)
	if gone(bystander) {
		t.Fatal("the sweep killed a process that was not the daemon's")
	}
}
