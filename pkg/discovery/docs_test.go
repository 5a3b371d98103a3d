package discovery

import (
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestDocsMatchDefaults checks the configuration table of docs/discovery.md
// against DefaultConfig, so the documented defaults cannot drift.
func TestDocsMatchDefaults(t *testing.T) {
	b, err := os.ReadFile("../../docs/discovery.md")
	if err != nil {
		t.Fatal(err)
	}
	c := DefaultConfig()
	want := map[string]string{
		"discovery.kind":                             c.Kind,
		"discovery.labels":                           emptyAs(len(c.Labels) == 0, "none", "?"),
		"discovery.static.peers":                     emptyAs(len(c.Static.Peers) == 0, "none", "?"),
		"discovery.consul.address":                   c.Consul.Address,
		"discovery.consul.token":                     emptyAs(c.Consul.Token == "", "none", c.Consul.Token),
		"discovery.consul.token_file":                emptyAs(c.Consul.TokenFile == "", "none", c.Consul.TokenFile),
		"discovery.consul.datacenter":                emptyAs(c.Consul.Datacenter == "", "agent's own", c.Consul.Datacenter),
		"discovery.consul.service":                   c.Consul.Service,
		"discovery.consul.ttl":                       shortDur(c.Consul.TTL),
		"discovery.consul.deregister_critical_after": shortDur(c.Consul.DeregisterCriticalAfter),
		"discovery.consul.update_interval":           shortDur(c.Consul.UpdateInterval),
		"discovery.consul.watch_wait":                shortDur(c.Consul.WatchWait),
		"discovery.consul.tls.ca_file":               emptyAs(c.Consul.TLS.CAFile == "", "none", c.Consul.TLS.CAFile),
		"discovery.consul.tls.cert_file":             emptyAs(c.Consul.TLS.CertFile == "", "none", c.Consul.TLS.CertFile),
		"discovery.consul.tls.key_file":              emptyAs(c.Consul.TLS.KeyFile == "", "none", c.Consul.TLS.KeyFile),
		"discovery.consul.tls.server_name":           emptyAs(c.Consul.TLS.ServerName == "", "none", c.Consul.TLS.ServerName),
		"discovery.consul.tls.insecure_skip_verify":  strconv.FormatBool(c.Consul.TLS.InsecureSkipVerify),
	}
	row := regexp.MustCompile("(?m)^\\| `(discovery\\.[a-z_.]+)` \\| `?([^|`]+?)`? \\|")
	got := map[string]string{}
	for _, m := range row.FindAllStringSubmatch(string(b), -1) {
		got[m[1]] = strings.TrimSpace(m[2])
	}
	for key, w := range want {
		g, ok := got[key]
		switch {
		case !ok:
			t.Errorf("docs/discovery.md: no row for %s (default %q)", key, w)
		case g != w:
			t.Errorf("docs/discovery.md: %s default is %q, code says %q", key, g, w)
		}
	}
	for key := range got {
		if _, ok := want[key]; !ok {
			t.Errorf("docs/discovery.md documents %s, which this test does not know", key)
		}
	}
	// The fixed values quoted in the prose.
	for _, s := range []string{
		"`DefaultRequestTimeout` (" + shortDur(DefaultRequestTimeout) + ")",
		"`DefaultRetryMin` (" + shortDur(DefaultRetryMin) + ")",
		"`DefaultRetryMax` (" + shortDur(DefaultRetryMax) + ")",
		"`DefaultWatchMinInterval` (" + shortDur(DefaultWatchMinInterval) + ")",
	} {
		if !strings.Contains(string(b), s) {
			t.Errorf("docs/discovery.md does not say %s", s)
		}
	}
}

func emptyAs(empty bool, doc, val string) string {
	if empty {
		return doc
	}
	return val
}

// shortDur renders 2m0s as 2m and 1m30s as 1m30s.
func shortDur(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}
