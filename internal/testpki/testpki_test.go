package testpki

import (
	"crypto/tls"
	"crypto/x509"
	"sync"
	"testing"
)

// Certificates issued at once under one name each load, verify against
// their CA and not against another.
func TestIssueConcurrentlyUnderOneName(t *testing.T) {
	ca, other := NewCA(t, "ca"), NewCA(t, "other")
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			certFile, keyFile := ca.Issue(t, "caller")
			pair, err := tls.LoadX509KeyPair(certFile, keyFile)
			if err != nil {
				t.Error(err)
				return
			}
			leaf, err := x509.ParseCertificate(pair.Certificate[0])
			if err != nil {
				t.Error(err)
				return
			}
			if leaf.Subject.CommonName != "caller" {
				t.Errorf("common name %q, want caller", leaf.Subject.CommonName)
			}
			roots := x509.NewCertPool()
			roots.AddCert(ca.Cert)
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
				t.Errorf("does not verify against its CA: %v", err)
			}
			foreign := x509.NewCertPool()
			foreign.AddCert(other.Cert)
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: foreign}); err == nil {
				t.Error("verifies against another CA")
			}
		})
	}
	wg.Wait()
}
