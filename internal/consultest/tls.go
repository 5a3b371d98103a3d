package consultest

import "github.com/snakepit/snakepit/internal/testpki"

// writeTLSFiles writes a fresh CA and a server certificate signed by it for
// 127.0.0.1 and localhost into dir, and returns the three file paths.
func writeTLSFiles(dir string) (caFile, certFile, keyFile string, err error) {
	ca, err := testpki.New(dir, "consultest CA")
	if err != nil {
		return "", "", "", err
	}
	certFile, keyFile, err = ca.Write("localhost")
	return ca.PEM, certFile, keyFile, err
}
