// Package consultest starts a real Consul agent for tests: a single-node dev
// server (in-memory, its own leader) on free loopback ports, one per test
// that asks for it.
//
// The binary is found in this order: $SNAKEPIT_CONSUL, <repo>/.cache/bin/consul
// (where scripts/install-consul.sh puts it), then consul on PATH. When none is
// found the test is skipped with a message saying to run the script, unless
// SNAKEPIT_REQUIRE_CONSUL=1 (set by make test and CI), which fails it instead.
// Under -short every test that asks for an agent is skipped.
package consultest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/snakepit/snakepit/internal/freeport"
)

// Environment variables read by this package.
const (
	// EnvBinary names the consul binary to use, overriding the search.
	EnvBinary = "SNAKEPIT_CONSUL"
	// EnvRequire set to "1" turns a missing binary into a test failure.
	EnvRequire = "SNAKEPIT_REQUIRE_CONSUL"
)

// StartTimeout bounds how long Start and Restart wait for the agent to elect
// itself leader and sync its node into the catalog.
const StartTimeout = 60 * time.Second

// Options adjust the agent that StartWith starts.
type Options struct {
	// ACL enables ACLs with default policy deny. The agent's management token
	// is then in Agent.Token; requests without it (or with another token)
	// get 403 from the agent.
	ACL bool
	// TLS also serves the HTTP API over TLS on HTTPSAddr, with a fresh CA
	// whose certificate is in CAFile (the server certificate is for
	// 127.0.0.1 and "localhost"). The plain HTTP API stays on Addr.
	TLS bool
}

// Agent is a running (or stopped) Consul dev agent owned by one test.
// Its methods are safe for concurrent use.
type Agent struct {
	// Addr is the HTTP API address, "127.0.0.1:port". It stays the same
	// across Stop and Restart.
	Addr string
	// Token is the ACL management token, "" unless Options.ACL.
	Token string
	// NodeName is the agent's node name in the catalog.
	NodeName string
	// HTTPSAddr and CAFile are set with Options.TLS.
	HTTPSAddr string
	CAFile    string

	t       testing.TB
	bin     string
	args    []string
	logPath string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// Binary returns the path of the consul binary to use, or an error saying how
// to install one.
func Binary() (string, error) {
	if p := os.Getenv(EnvBinary); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("%s=%s: %w (unset it to use the binary that scripts/install-consul.sh caches)", EnvBinary, p, err)
		}
		return p, nil
	}
	if root, err := repoRoot(); err == nil {
		p := filepath.Join(root, ".cache", "bin", "consul")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	if p, err := exec.LookPath("consul"); err == nil {
		return p, nil
	}
	return "", errors.New("no consul binary: run scripts/install-consul.sh (it caches one at .cache/bin/consul), or set " + EnvBinary)
}

// repoRoot walks up from the working directory (a package directory under
// go test) to the directory holding go.mod.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.mod not found above the working directory")
		}
		dir = parent
	}
}

// Start starts a Consul dev agent on free loopback ports and waits until it
// is leader and its node is in the catalog. The agent is killed (with its
// process group) when the test ends.
func Start(t testing.TB) *Agent {
	t.Helper()
	return StartWith(t, Options{})
}

// StartWith is Start with options.
func StartWith(t testing.TB, opts Options) *Agent {
	t.Helper()
	if testing.Short() {
		t.Skip("consultest: needs a Consul agent; skipped under -short")
	}
	bin, err := Binary()
	if err != nil {
		if os.Getenv(EnvRequire) == "1" {
			t.Fatalf("consultest: %v (%s=1)", err, EnvRequire)
		}
		t.Skipf("consultest: %v", err)
	}
	var a *Agent
	// A port found free can still be taken before the agent binds it; the
	// agent then exits at once naming it. Pick new ports and try again.
	for attempt := 1; ; attempt++ {
		var err error
		a, err = newAgent(t, bin, t.TempDir(), opts)
		if err != nil {
			t.Fatalf("consultest: %v", err)
		}
		err = a.start()
		if err == nil {
			break
		}
		if attempt < bindAttempts && strings.Contains(a.logTail(40), "address already in use") {
			t.Logf("consultest: a port was taken before the agent bound it; retrying on new ports (attempt %d)", attempt)
			continue
		}
		t.Fatalf("consultest: %v", err) // the error carries the log's tail
	}
	t.Cleanup(a.Stop)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("consultest: agent log tail (%s):\n%s", a.logPath, a.logTail(40))
		}
	})
	return a
}

// bindAttempts bounds how many sets of ports StartWith tries.
const bindAttempts = 3

// newAgent lays out an agent's ports, files and arguments without starting it.
func newAgent(t testing.TB, bin, dir string, opts Options) (*Agent, error) {
	ports, err := freeport.Get(5, freeport.TCPAndUDP)
	if err != nil {
		return nil, err
	}
	httpPort, serverPort, lanPort, wanPort := ports[0], ports[1], ports[2], ports[3]
	a := &Agent{
		Addr:     net.JoinHostPort("127.0.0.1", strconv.Itoa(httpPort)),
		NodeName: "consultest-" + strconv.Itoa(httpPort),
		t:        t,
		bin:      bin,
		logPath:  filepath.Join(dir, "consul.log"),
	}
	a.args = []string{
		"agent", "-dev",
		"-node", a.NodeName,
		"-bind", "127.0.0.1", "-client", "127.0.0.1",
		"-http-port", strconv.Itoa(httpPort),
		"-server-port", strconv.Itoa(serverPort),
		"-serf-lan-port", strconv.Itoa(lanPort),
		"-serf-wan-port", strconv.Itoa(wanPort),
		"-dns-port", "-1", "-grpc-port", "-1", "-grpc-tls-port", "-1",
		"-log-level", "info",
		"-hcl", "disable_update_check = true",
	}
	if opts.TLS {
		ca, cert, key, err := writeTLSFiles(dir)
		if err != nil {
			return nil, fmt.Errorf("tls: %w", err)
		}
		a.CAFile = ca
		a.HTTPSAddr = net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[4]))
		a.args = append(a.args, "-hcl", fmt.Sprintf(
			`ports { https = %d } tls { defaults { ca_file = %q, cert_file = %q, key_file = %q, verify_incoming = false } }`,
			ports[4], ca, cert, key))
	}
	if opts.ACL {
		a.Token = newUUID()
		a.args = append(a.args, "-hcl", fmt.Sprintf(
			`acl { enabled = true, default_policy = "deny", tokens { initial_management = %q, agent = %q } }`,
			a.Token, a.Token))
	}
	return a, nil
}

// Stop kills the agent (SIGKILL to its process group, as a crash would) and
// waits until it has exited. Being a dev agent it forgets everything: a later
// Restart comes up empty, like an agent that lost its state. Stop on a
// stopped agent does nothing.
func (a *Agent) Stop() {
	a.mu.Lock()
	cmd, done := a.cmd, a.done
	a.cmd = nil
	a.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	<-done
}

// Restart stops the agent if it runs and starts it again on the same ports,
// waiting as Start does. It fails the test if the agent does not come up.
func (a *Agent) Restart() {
	a.t.Helper()
	a.Stop()
	if err := a.start(); err != nil {
		a.t.Fatalf("consultest: restart: %v", err)
	}
}

func (a *Agent) start() error {
	logf, err := os.OpenFile(a.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(a.bin, a.args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", a.bin, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	a.mu.Lock()
	a.cmd, a.done = cmd, done
	a.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), StartTimeout)
	defer cancel()
	if err := a.waitReady(ctx, done); err != nil {
		a.Stop()
		return fmt.Errorf("agent on %s not ready: %w\n%s", a.Addr, err, a.logTail(30))
	}
	return nil
}

// waitReady polls the agent until it has a leader and its own node is in the
// catalog (so services registered next are synced at once).
func (a *Agent) waitReady(ctx context.Context, exited <-chan struct{}) error {
	client := &http.Client{Timeout: 2 * time.Second}
	leader := func() bool {
		body, ok := a.get(ctx, client, "/v1/status/leader")
		return ok && len(bytes.Trim(bytes.TrimSpace(body), `"`)) > 0
	}
	node := func() bool {
		_, ok := a.get(ctx, client, "/v1/catalog/node/"+a.NodeName)
		return ok
	}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if leader() && node() {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-exited:
			return errors.New("agent exited")
		case <-tick.C:
		}
	}
}

func (a *Agent) get(ctx context.Context, c *http.Client, path string) ([]byte, bool) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+a.Addr+path, nil)
	if err != nil {
		return nil, false
	}
	if a.Token != "" {
		req.Header.Set("X-Consul-Token", a.Token)
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, false
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		return nil, false
	}
	// The catalog answers "null" for a node it does not know yet.
	if string(bytes.TrimSpace(body)) == "null" {
		return nil, false
	}
	return body, true
}

func (a *Agent) logTail(n int) string {
	b, err := os.ReadFile(a.logPath)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// ServiceHealth returns the instances of service that the agent holds, by
// service ID, each with its aggregated check status ("passing" when every
// check passes, else the status of a check that does not).
func (a *Agent) ServiceHealth(service string) (map[string]string, error) {
	resp, err := http.Get("http://" + a.Addr + "/v1/health/service/" + service)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var entries []struct {
		Service struct{ ID string }
		Checks  []struct{ Status string }
	}
	if err := json.NewDecoder(resp.Body).Decode(&entries); err != nil {
		return nil, fmt.Errorf("consul health of %s: %w", service, err)
	}
	out := map[string]string{}
	for _, e := range entries {
		st := "passing"
		for _, c := range e.Checks {
			if c.Status != "passing" {
				st = c.Status
			}
		}
		out[e.Service.ID] = st
	}
	return out, nil
}
