package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/snakepit/snakepit/internal/freeport"
	"github.com/snakepit/snakepit/internal/testpki"
	"github.com/snakepit/snakepit/pkg/client"
	"github.com/snakepit/snakepit/pkg/discovery"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

func tlsDial(t *testing.T, addr string, ca *testpki.CA, certFile, keyFile string) *client.Conn {
	t.Helper()
	cfg := &tls.Config{}
	if ca != nil {
		pool := x509.NewCertPool()
		pool.AddCert(ca.Cert)
		cfg.RootCAs = pool
	}
	if certFile != "" {
		c, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{c}
	}
	c, err := client.Dial(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestMutualTLS(t *testing.T) {
	ca := testpki.NewCA(t, "cluster-ca")
	foreign := testpki.NewCA(t, "foreign-ca")
	nodeCert, nodeKey := ca.Issue(t, "node-a")
	cfg := testConfig(t)
	cfg.TLS = TLSConfig{CertFile: nodeCert, KeyFile: nodeKey, ClientCAFile: ca.PEM, ClientAuth: ClientAuthRequire}
	cfg.AdminIdentities = []string{"ops"}
	tn := startNodeTLS(t, cfg, ca)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req := &snakepitv1.ExecuteRequest{Pool: "test", Tool: "noop"}

	peerCert, peerKey := ca.Issue(t, "node-b")
	if _, err := tlsDial(t, tn, ca, peerCert, peerKey).Snakepit.Execute(ctx, req); err != nil {
		t.Fatalf("a peer with a certificate of the cluster CA: %v", err)
	}
	if _, err := tlsDial(t, tn, ca, "", "").Snakepit.Execute(ctx, req); status.Code(err) != codes.Unavailable {
		t.Fatalf("a caller without a certificate = %v, want refused (UNAVAILABLE at the handshake)", err)
	}
	fCert, fKey := foreign.Issue(t, "intruder")
	if _, err := tlsDial(t, tn, ca, fCert, fKey).Snakepit.Execute(ctx, req); status.Code(err) != codes.Unavailable {
		t.Fatalf("a caller with a foreign certificate = %v, want refused", err)
	}
	// Dialing a node whose certificate the cluster CA did not sign fails:
	// a node never routes to it.
	other := testConfig(t)
	oCert, oKey := foreign.Issue(t, "node-x")
	other.TLS = TLSConfig{CertFile: oCert, KeyFile: oKey}
	xaddr := startNodeTLS(t, other, foreign)
	creds, err := cfg.TLS.PeerCredentials()
	if err != nil {
		t.Fatal(err)
	}
	pc, err := client.Dial(xaddr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if _, err := pc.Snakepit.Execute(ctx, req); status.Code(err) != codes.Unavailable {
		t.Fatalf("dialing a foreign node with peer credentials = %v, want refused", err)
	}
	// Admin over TCP: a certificate listed in admin_identities is granted,
	// another one of the same CA is not.
	opsCert, opsKey := ca.Issue(t, "ops")
	if _, err := tlsDial(t, tn, ca, opsCert, opsKey).Admin.Cordon(ctx, &snakepitv1.CordonRequest{}); err != nil {
		t.Fatalf("Cordon as ops: %v", err)
	}
	_, err = tlsDial(t, tn, ca, peerCert, peerKey).Admin.Cordon(ctx, &snakepitv1.CordonRequest{})
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), `client certificate "node-b" is not listed in admin_identities`) {
		t.Fatalf("Cordon as node-b = %v, want PERMISSION_DENIED naming the certificate", err)
	}
}

func TestTLSConfigErrors(t *testing.T) {
	for _, tt := range []struct {
		tls  TLSConfig
		want string
	}{
		{TLSConfig{CertFile: "a.pem"}, "tls.cert_file and tls.key_file must both be set"},
		{TLSConfig{CertFile: "a", KeyFile: "b", ClientAuth: "maybe"}, "tls.client_auth must be none, request or require"},
		{TLSConfig{CertFile: "a", KeyFile: "b", ClientAuth: "require"}, "needs tls.client_ca_file"},
	} {
		cfg := testConfig(t)
		cfg.TLS = tt.tls
		if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Validate(%+v) = %v, want %q", tt.tls, err, tt.want)
		}
	}
	cfg := testConfig(t)
	cfg.TLS = TLSConfig{CertFile: "/nonexistent/c.pem", KeyFile: "/nonexistent/k.pem"}
	if err := Serve(context.Background(), cfg, zerolog.Nop(), Hooks{}); err == nil || !strings.Contains(err.Error(), "tls.cert_file") {
		t.Fatalf("Serve with missing certificate files = %v, want an error naming tls.cert_file", err)
	}
}

// startNodeTLS serves cfg (TLS on) and waits until it is ready; it returns
// the address.
func startNodeTLS(t *testing.T, cfg Config, ca *testpki.CA) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	addrCh := make(chan string, 1)
	ready := make(chan struct{})
	errCh := make(chan error, 1)
	go func() {
		errCh <- Serve(ctx, cfg, zerolog.Nop(), Hooks{
			Listening: func(a net.Addr) { addrCh <- a.String() },
			Ready:     func() { close(ready) },
		})
	}()
	addr := <-addrCh
	select {
	case <-ready:
	case err := <-errCh:
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		if err := <-errCh; err != nil {
			t.Error(err)
		}
	})
	return addr
}

// A cluster with mutual TLS in which one listed peer's certificate was not
// signed by the cluster CA: no call is ever routed to it, and none fails.
// Sessions it would own start on their next owner; sessionless calls go to
// the trusted nodes. (The entry node's handshake with it fails before any
// request is sent, so each attempt is provably not started, and its
// breaker ejects it.)
func TestMutualTLSForeignPeerNeverRoutedTo(t *testing.T) {
	if testing.Short() {
		t.Skip("three nodes with workers")
	}
	ca := testpki.NewCA(t, "cluster-ca")
	foreign := testpki.NewCA(t, "foreign-ca")
	ids := []string{"node-0", "node-1", "node-x"}
	addrs := make([]string, len(ids))
	for i := range ids {
		addrs[i] = freeport.MustAddr(t)
	}
	var wg sync.WaitGroup
	for i, id := range ids {
		signer := ca
		if id == "node-x" {
			signer = foreign
		}
		cert, key := signer.Issue(t, id)
		cfg := testConfig(t, PoolConfig{Name: "test", Adapter: testAdapter(t, "tools.py"), Size: 1})
		cfg.NodeID, cfg.Listen = id, addrs[i]
		cfg.MetricsListen, cfg.AdminSocket = "off", "off"
		cfg.NewSessionsPerSecond = -1
		cfg.TLS = TLSConfig{CertFile: cert, KeyFile: key, ClientCAFile: signer.PEM, ClientAuth: ClientAuthRequire}
		if id == "node-x" {
			// It would take any caller: only the entry node's check of
			// its certificate keeps calls away from it.
			cfg.TLS = TLSConfig{CertFile: cert, KeyFile: key}
		}
		cfg.Discovery = discovery.DefaultConfig()
		for j := range ids {
			if j != i {
				cfg.Discovery.Static.Peers = append(cfg.Discovery.Static.Peers, discovery.StaticPeer{
					ID: discovery.NodeID(ids[j]), Addr: addrs[j], Pools: map[string]int{"test": 1}})
			}
		}
		wg.Go(func() { startNodeTLS(t, cfg, signer) })
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	cert, key := ca.Issue(t, "caller")
	entry := tlsDial(t, addrs[0], ca, cert, key)
	owner := owners(t, ids, []int{1, 1, 1})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	toForeign := 0
	for i := range 60 {
		req := &snakepitv1.ExecuteRequest{Pool: "test", Tool: "noop"}
		if i%2 == 0 {
			req.SessionId = fmt.Sprintf("tls-%d", i)
			if owner(req.SessionId) == "node-x" {
				toForeign++
			}
		}
		r, err := entry.Snakepit.Execute(ctx, req)
		if err != nil {
			t.Fatalf("call %d (session %q) through node-0: %v", i, req.SessionId, err)
		}
		if r.GetRanOn().GetNodeId() == "node-x" {
			t.Fatalf("call %d ran on node-x, whose certificate the cluster CA did not sign", i)
		}
	}
	if toForeign == 0 {
		t.Fatal("no session owned by node-x: the check proves nothing")
	}
}
