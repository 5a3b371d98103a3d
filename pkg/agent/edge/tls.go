package edge

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"slices"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// Client certificate policies of TLSConfig.ClientAuth.
const (
	ClientAuthNone    = "none"
	ClientAuthRequest = "request" // verify a certificate when one is sent
	ClientAuthRequire = "require" // refuse callers without a certificate the CA signed
)

// TLSConfig turns on TLS for the gRPC port. With ClientCAFile and
// client_auth "require" it is mutual TLS: peers and clients must present a
// certificate the cluster CA signed, and a node dials its peers with its
// own certificate and trusts only servers that CA signed.
type TLSConfig struct {
	// CertFile and KeyFile are the node's certificate and key (PEM).
	CertFile string `mapstructure:"cert_file"`
	KeyFile  string `mapstructure:"key_file"`
	// ClientCAFile is the cluster CA (PEM) that signs client and peer
	// certificates.
	ClientCAFile string `mapstructure:"client_ca_file"`
	// ClientAuth is none, request or require.
	ClientAuth string `mapstructure:"client_auth"`
}

// Enabled reports whether TLS is configured.
func (t TLSConfig) Enabled() bool { return t.CertFile != "" || t.KeyFile != "" }

// Validate reports each bad tls.* key to bad.
func (t TLSConfig) Validate(bad func(string, ...any)) {
	if t.Enabled() && (t.CertFile == "" || t.KeyFile == "") {
		bad("tls.cert_file and tls.key_file must both be set (got %q and %q)", t.CertFile, t.KeyFile)
	}
	switch t.ClientAuth {
	case "", ClientAuthNone, ClientAuthRequest, ClientAuthRequire:
	default:
		bad("tls.client_auth must be none, request or require (got %q)", t.ClientAuth)
	}
	if (t.ClientAuth == ClientAuthRequest || t.ClientAuth == ClientAuthRequire) && t.ClientCAFile == "" {
		bad("tls.client_auth %q needs tls.client_ca_file", t.ClientAuth)
	}
	if t.ClientCAFile != "" && !t.Enabled() {
		bad("tls.client_ca_file needs tls.cert_file and tls.key_file")
	}
}

// serverTLS builds the gRPC port's TLS configuration.
func (t TLSConfig) serverTLS() (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("tls.cert_file/tls.key_file: %w", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if t.ClientCAFile != "" {
		pool, err := loadCA(t.ClientCAFile)
		if err != nil {
			return nil, err
		}
		cfg.ClientCAs = pool
		switch t.ClientAuth {
		case ClientAuthRequire:
			cfg.ClientAuth = tls.RequireAndVerifyClientCert
		case ClientAuthRequest:
			cfg.ClientAuth = tls.VerifyClientCertIfGiven
		}
	}
	return cfg, nil
}

// PeerCredentials are the transport credentials a node dials its peers
// with: its own certificate as client certificate, and trust in the
// cluster CA only. Nil when TLS is off.
func (t TLSConfig) PeerCredentials() (credentials.TransportCredentials, error) {
	if !t.Enabled() {
		return nil, nil
	}
	cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("tls.cert_file/tls.key_file: %w", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if t.ClientCAFile != "" {
		if cfg.RootCAs, err = loadCA(t.ClientCAFile); err != nil {
			return nil, err
		}
	}
	return credentials.NewTLS(cfg), nil
}

func loadCA(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("tls.client_ca_file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("tls.client_ca_file %s holds no PEM certificate", path)
	}
	return pool, nil
}

// callerIdentities are the names of a caller's verified client
// certificate: its common name and DNS names.
func callerIdentities(p *peer.Peer) []string {
	if p == nil {
		return nil
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(ti.State.VerifiedChains) == 0 || len(ti.State.PeerCertificates) == 0 {
		return nil
	}
	c := ti.State.PeerCertificates[0]
	return append([]string{c.Subject.CommonName}, c.DNSNames...)
}

func isAdmin(p *peer.Peer, admins []string) bool {
	for _, id := range callerIdentities(p) {
		if id != "" && slices.Contains(admins, id) {
			return true
		}
	}
	return false
}
