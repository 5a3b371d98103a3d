// Package testpki makes certificate authorities and certificates for tests
// and benchmarks of TLS and mutual TLS: ECDSA P-256, valid from an hour ago
// for a day, written as PEM files. New and CA.Write return errors (for
// code that is not a test); NewCA and CA.Issue fail the test instead.
package testpki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

// CA is a certificate authority; its certificates are written to its
// directory.
type CA struct {
	// Cert is the CA's certificate.
	Cert *x509.Certificate
	// PEM is the path of the CA's certificate in PEM.
	PEM string
	key *ecdsa.PrivateKey
	dir string
}

var serial atomic.Int64

// validity bounds every certificate: from an hour ago (clock skew) for a day.
func validity() (notBefore, notAfter time.Time) {
	now := time.Now()
	return now.Add(-time.Hour), now.Add(24 * time.Hour)
}

// New makes a CA whose certificate's common name is name, and writes its
// certificate (PEM) into dir, where Write puts the certificates it issues.
func New(dir, name string) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	from, until := validity()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial.Add(1)), Subject: pkix.Name{CommonName: name},
		NotBefore: from, NotAfter: until,
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	ca := &CA{Cert: cert, key: key, dir: dir}
	ca.PEM = filepath.Join(dir, "ca.pem")
	if err := write(ca.PEM, "CERTIFICATE", der, 0o644); err != nil {
		return nil, err
	}
	return ca, nil
}

// Write writes a certificate for cn, signed by the CA and valid for
// 127.0.0.1 and the DNS name cn, as server and as client, and its key; it
// returns their paths. It is safe for concurrent use: each certificate has
// files of its own, named by cn and serial.
func (ca *CA) Write(cn string) (certFile, keyFile string, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", err
	}
	sn := serial.Add(1)
	from, until := validity()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(sn), Subject: pkix.Name{CommonName: cn},
		NotBefore: from, NotAfter: until,
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{cn},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		KeyUsage:    x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.key)
	if err != nil {
		return "", "", err
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return "", "", err
	}
	base := filepath.Join(ca.dir, fmt.Sprintf("%s-%d", cn, sn))
	certFile, keyFile = base+".pem", base+".key"
	if err := write(certFile, "CERTIFICATE", der, 0o644); err != nil {
		return "", "", err
	}
	if err := write(keyFile, "EC PRIVATE KEY", kb, 0o600); err != nil {
		return "", "", err
	}
	return certFile, keyFile, nil
}

// NewCA is New into the test's temporary directory; it fails the test on
// error.
func NewCA(t testing.TB, name string) *CA {
	t.Helper()
	ca, err := New(t.TempDir(), name)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

// Issue is Write that fails the test on error.
func (ca *CA) Issue(t testing.TB, cn string) (certFile, keyFile string) {
	t.Helper()
	certFile, keyFile, err := ca.Write(cn)
	if err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

func write(path, typ string, der []byte, mode os.FileMode) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode)
}
