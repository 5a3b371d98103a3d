package bench

import (
	"context"
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
	"time"

	"github.com/snakepit/snakepit/pkg/client"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// benchTLS: the cost of TLS on the Execute path, against the same daemon
// configuration in plaintext, in the same run.
func benchTLS(ctx context.Context, o options, r *report) error {
	dir, err := os.MkdirTemp("", "spbench-tls-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	caFile, certFile, keyFile, err := writeCerts(dir)
	if err != nil {
		return err
	}
	measure := func(config string, tls bool) (time.Duration, float64, error) {
		var d *daemon
		var err error
		if tls {
			opt, derr := client.TLS(caFile, "", "")
			if derr != nil {
				return 0, 0, derr
			}
			d, err = startDaemon(ctx, o, config, opt)
		} else {
			d, err = startDaemon(ctx, o, config)
		}
		if err != nil {
			return 0, 0, err
		}
		defer d.stop()
		req := &snakepitv1.ExecuteRequest{Tool: "noop"}
		call := func() error { _, err := d.conn.Snakepit.Execute(ctx, req); return err }
		for i := 0; i < 300; i++ {
			if err := call(); err != nil {
				return 0, 0, err
			}
		}
		lat, err := latencies(3000, call)
		if err != nil {
			return 0, 0, err
		}
		tput, err := throughput(32, o.duration, func(int) error { return call() })
		return pct(lat, 0.5), tput, err
	}
	base := poolConfig(2, 1)
	plainP50, plainTput, err := measure(base, false)
	if err != nil {
		return err
	}
	tlsP50, tlsTput, err := measure(base+fmt.Sprintf("tls:\n  cert_file: %s\n  key_file: %s\n", certFile, keyFile), true)
	if err != nil {
		return err
	}
	r.table("TLS on the Execute path (floor: the same daemon in plaintext)", []row{
		{"p50, concurrency 1", us(tlsP50), us(plainP50), fmt.Sprintf("+%s", us(tlsP50-plainP50))},
		{"throughput, concurrency 32", fmt.Sprintf("%.0f calls/s", tlsTput), fmt.Sprintf("%.0f calls/s", plainTput), fmt.Sprintf("ratio %.2f", tlsTput/plainTput)},
	})
	return nil
}

// writeCerts writes a CA and a server certificate for 127.0.0.1 signed by
// it; it returns the CA, certificate and key paths.
func writeCerts(dir string) (ca, cert, key string, err error) {
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "spbench-ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return "", "", "", err
	}
	caCert, _ := x509.ParseCertificate(caDER)
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "spbench-node"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		KeyUsage: x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &k.PublicKey, caKey)
	if err != nil {
		return "", "", "", err
	}
	kb, _ := x509.MarshalECPrivateKey(k)
	ca, cert, key = filepath.Join(dir, "ca.pem"), filepath.Join(dir, "node.pem"), filepath.Join(dir, "node.key")
	for _, f := range []struct {
		path, typ string
		b         []byte
	}{{ca, "CERTIFICATE", caDER}, {cert, "CERTIFICATE", der}, {key, "EC PRIVATE KEY", kb}} {
		if err := os.WriteFile(f.path, pem.EncodeToMemory(&pem.Block{Type: f.typ, Bytes: f.b}), 0o600); err != nil {
			return "", "", "", err
		}
	}
	return ca, cert, key, nil
}
