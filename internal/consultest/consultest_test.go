package consultest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"os"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func leader(t *testing.T, a *Agent, token string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+a.Addr+"/v1/agent/self", nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("X-Consul-Token", token)
	}
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Do(req)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

func TestStartStopRestart(t *testing.T) {
	a := Start(t)
	if got := leader(t, a, ""); got != http.StatusOK {
		t.Fatalf("GET /v1/agent/self = %d, want 200", got)
	}
	a.Stop()
	if got := leader(t, a, ""); got != 0 {
		t.Fatalf("after Stop: GET /v1/agent/self answered %d, want connection refused", got)
	}
	a.Stop() // idempotent
	a.Restart()
	if got := leader(t, a, ""); got != http.StatusOK {
		t.Fatalf("after Restart: GET /v1/agent/self = %d, want 200", got)
	}
}

func TestACL(t *testing.T) {
	a := StartWith(t, Options{ACL: true})
	if a.Token == "" {
		t.Fatal("ACL agent has no management token")
	}
	if got := leader(t, a, ""); got != http.StatusForbidden {
		t.Errorf("anonymous GET /v1/agent/self = %d, want 403", got)
	}
	if got := leader(t, a, a.Token); got != http.StatusOK {
		t.Errorf("management GET /v1/agent/self = %d, want 200", got)
	}
}

func TestTLS(t *testing.T) {
	a := StartWith(t, Options{TLS: true})
	if a.HTTPSAddr == "" || a.CAFile == "" {
		t.Fatalf("HTTPSAddr=%q CAFile=%q, want both set", a.HTTPSAddr, a.CAFile)
	}
	pem, err := os.ReadFile(a.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatal("CA file holds no certificate")
	}
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true, TLSClientConfig: &tls.Config{RootCAs: pool}}}
	resp, err := c.Get("https://" + a.HTTPSAddr + "/v1/status/leader")
	if err != nil {
		t.Fatalf("GET over TLS: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("GET over TLS = %d, want 200", resp.StatusCode)
	}
}
