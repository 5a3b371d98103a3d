package main

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snakepit/snakepit/internal/testpki"
	"github.com/snakepit/snakepit/pkg/client"
	"github.com/snakepit/snakepit/pkg/router"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// startTLSNode starts snakepitd with mutual TLS: its certificate for id is
// signed by signer, it requires client certificates signed by signer, and
// admin_identities lists "ops". The returned node's connection presents a
// "caller" certificate signed by signer.
func startTLSNode(t *testing.T, bin, id, consulAddr string, signer *testpki.CA) *clusterNode {
	t.Helper()
	cert, key := signer.Issue(t, id)
	pool := "  - name: default\n    adapter: snakepit_examples.example\n    size: 1\n"
	cfg := fmt.Sprintf(`tls:
  cert_file: %s
  key_file: %s
  client_ca_file: %s
  client_auth: require
admin_identities: [ops]
`, cert, key, signer.PEM) + clusterConfig(id, consulAddr, 5*time.Second, pool)
	d, _ := launchNode(t, bin, id, cfg, t.TempDir())
	return &clusterNode{daemonProc: d, id: id, conn: dialServing(t, d.addr, tlsTo(t, signer, "caller"))}
}

// tlsTo returns the dial option that trusts ca and presents a certificate
// for cn signed by ca.
func tlsTo(t *testing.T, ca *testpki.CA, cn string) grpc.DialOption {
	t.Helper()
	cert, key := ca.Issue(t, cn)
	opt, err := client.TLS(ca.PEM, cert, key)
	if err != nil {
		t.Fatal(err)
	}
	return opt
}

// TestClusterMutualTLS runs the security checks on separate processes with
// real Consul: three nodes of one cluster CA and node-x, whose certificate
// another CA signed, all registered in the same Consul. The cluster's
// routers see node-x in discovery but never run a call there (the sessions
// it would own start on their next owners), and node-x cannot get a call
// into the cluster; a caller whose certificate the cluster CA did not sign
// is refused; admin over TCP is granted to the listed identity only, and
// not to a certificate of that name from another CA.
func TestClusterMutualTLS(t *testing.T) {
	bin, ctl, agent := skipUnlessCluster(t)
	ca := testpki.NewCA(t, "cluster-ca")
	foreign := testpki.NewCA(t, "foreign-ca")
	ids := []string{"node-a", "node-b", "node-c", "node-x"}
	nodes := make([]*clusterNode, len(ids))
	var wg sync.WaitGroup
	for i, id := range ids {
		signer := ca
		if id == "node-x" {
			signer = foreign
		}
		wg.Go(func() { nodes[i] = startTLSNode(t, bin, id, agent.Addr, signer) })
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	for _, n := range nodes {
		waitView(t, n, 20*time.Second, ids...)
	}
	trusted, x := nodes[:3], nodes[3]

	// The owners any router computes over the four nodes, node-x included.
	var peers []router.Peer
	for _, id := range ids {
		peers = append(peers, router.Peer{ID: router.NodeID(id), Healthy: true, Pools: map[string]int{"default": 1}})
	}
	table, err := router.NewTable(peers, "")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	toForeign := 0
	for _, entry := range trusted {
		for i := range 40 {
			req := &snakepitv1.ExecuteRequest{Tool: "echo", Args: []byte(`{"n": 1}`)}
			if i%2 == 0 {
				req.SessionId = fmt.Sprintf("%s-s%d", entry.id, i)
				c, err := table.Rank(router.Request{SessionID: req.SessionId, Pool: "default", Max: 1}, nil, nil)
				if err != nil {
					t.Fatal(err)
				}
				if c[0].ID == "node-x" {
					toForeign++
				}
			}
			r, err := entry.conn.Snakepit.Execute(ctx, req)
			if err != nil {
				t.Fatalf("call %d (session %q) through %s: %v", i, req.SessionId, entry.id, err)
			}
			if r.GetRanOn().GetNodeId() == "node-x" {
				t.Fatalf("call %d through %s ran on node-x, whose certificate the cluster CA did not sign", i, entry.id)
			}
		}
	}
	if toForeign == 0 {
		t.Fatal("no session owned by node-x: the check proves nothing")
	}

	// node-x cannot get a call into the cluster: sessionless calls through
	// it (power of two choices over four nodes picks a trusted one for most)
	// all run on node-x itself.
	for i := range 20 {
		r, err := x.conn.Snakepit.Execute(ctx, &snakepitv1.ExecuteRequest{Tool: "echo", Args: []byte(`{"n": 1}`)})
		if err != nil {
			t.Fatalf("sessionless call %d through node-x: %v", i, err)
		}
		if got := r.GetRanOn().GetNodeId(); got != "node-x" {
			t.Fatalf("sessionless call %d through node-x ran on %s: a trusted node accepted node-x's certificate", i, got)
		}
	}

	// A caller with a certificate of another CA is refused before any
	// request is read.
	outsider, err := client.Dial(trusted[0].addr, tlsTo(t, foreign, "caller"))
	if err != nil {
		t.Fatal(err)
	}
	defer outsider.Close()
	_, err = outsider.Snakepit.Execute(ctx, &snakepitv1.ExecuteRequest{Tool: "echo", Args: []byte(`{"n": 1}`)})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("call with a foreign CA's certificate: %v, want UNAVAILABLE (handshake refused)", err)
	}

	// Admin over TCP: the listed identity, from the cluster CA, only.
	spctl := func(signer *testpki.CA, cn string, args ...string) (string, error) {
		cert, key := signer.Issue(t, cn)
		all := append([]string{"--addr", trusted[2].addr, "--tls-ca", ca.PEM, "--tls-cert", cert, "--tls-key", key}, args...)
		out, err := exec.Command(ctl, all...).CombinedOutput()
		return string(out), err
	}
	if out, err := spctl(ca, "ops", "status", "-o", "json"); err != nil || !strings.Contains(out, `"node-c"`) {
		t.Fatalf("spctl status as ops (cluster CA): %v\n%s", err, out)
	}
	if out, err := spctl(ca, "caller", "cordon"); err == nil || !strings.Contains(out, `PermissionDenied: the client certificate "caller" is not listed in admin_identities`) {
		t.Fatalf("spctl cordon as caller (not an admin identity): %v, want PermissionDenied\n%s", err, out)
	}
	if out, err := spctl(foreign, "ops", "cordon"); err == nil || !strings.Contains(out, "Unavailable") {
		t.Fatalf("spctl cordon as ops with a foreign CA's certificate: %v, want Unavailable (handshake refused)\n%s", err, out)
	}
	if out, err := spctl(ca, "ops", "status", "-o", "json"); err != nil || strings.Contains(out, `"cordoned": true`) {
		t.Fatalf("node-c after refused cordons: %v\n%s", err, out)
	}

	// Every component's log lines (agent, hw, cluster, router, discovery)
	// are well-formed: no key twice.
	for _, n := range nodes {
		if checkLogKeys(t, n.id, n.daemonProc) == 0 {
			t.Errorf("%s logged nothing", n.id)
		}
	}
}
