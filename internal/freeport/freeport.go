// Package freeport hands tests loopback ports that a process started later
// (a Consul agent, a daemon named in a static peer list) can bind.
//
// A port taken from a listener on ":0" comes from the kernel's ephemeral
// range, the same range every outgoing connection's source port comes from.
// Between closing that listener and the later bind, any connection made on
// the machine (other test packages run in parallel) may take the port, and
// the later bind fails with "address already in use". Ports handed out here
// lie outside the ephemeral range (read from
// /proc/sys/net/ipv4/ip_local_port_range), where the kernel never picks a
// port by itself, are chosen at random so that parallel test processes
// rarely pick the same one, and are checked free at the time of the call.
package freeport

import (
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

// The range used when the ephemeral range cannot be read or leaves no room.
const (
	fallbackLo = 10000
	fallbackHi = 32767
	// minSpan is the smallest span of non-ephemeral ports worth using.
	minSpan = 2000
)

var (
	mu     sync.Mutex
	issued = map[int]bool{} // never hand out a port twice in one process
)

// Proto says which protocols a port must be free for.
type Proto int

const (
	// TCP ports are checked free for TCP only.
	TCP Proto = iota
	// TCPAndUDP ports are checked free for TCP and UDP on the same number
	// (serf listens on both).
	TCPAndUDP
)

// Get returns n distinct loopback ports, free for proto right now, outside
// the kernel's ephemeral range. Nothing holds them after the call.
func Get(n int, proto Proto) ([]int, error) {
	lo, hi := span()
	mu.Lock()
	defer mu.Unlock()
	var ports []int
	for tries := 0; len(ports) < n; tries++ {
		if tries > 1000 {
			return nil, fmt.Errorf("freeport: no free port in %d-%d after 1000 tries", lo, hi)
		}
		p := lo + rand.IntN(hi-lo+1)
		if issued[p] || !free(p, proto) {
			continue
		}
		issued[p] = true
		ports = append(ports, p)
	}
	return ports, nil
}

// Addr returns one free loopback TCP address, "127.0.0.1:port".
func Addr() (string, error) {
	p, err := Get(1, TCP)
	if err != nil {
		return "", err
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(p[0])), nil
}

// TB is the part of testing.TB that MustAddr uses.
type TB interface {
	Helper()
	Fatalf(format string, args ...any)
}

// MustAddr is Addr that fails the test on error.
func MustAddr(t TB) string {
	t.Helper()
	a, err := Addr()
	if err != nil {
		t.Fatalf("%v", err)
	}
	return a
}

func free(port int, proto Proto) bool {
	var closers []io.Closer
	defer func() {
		for _, c := range closers {
			c.Close()
		}
	}()
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return false
	}
	closers = append(closers, l)
	if proto == TCPAndUDP {
		u, err := net.ListenPacket("udp", addr)
		if err != nil {
			return false
		}
		closers = append(closers, u)
	}
	return true
}

// span is the range to pick from: below the ephemeral range if there is
// room, else above it, else the fallback.
func span() (lo, hi int) {
	elo, ehi, err := ephemeral()
	if err != nil {
		return fallbackLo, fallbackHi
	}
	switch {
	case elo-1-fallbackLo >= minSpan:
		return fallbackLo, elo - 1
	case 65535-(ehi+1) >= minSpan:
		return ehi + 1, 65535
	}
	return fallbackLo, fallbackHi
}

func ephemeral() (lo, hi int, err error) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0, 0, err
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 0, 0, errors.New("freeport: unexpected ip_local_port_range")
	}
	if lo, err = strconv.Atoi(f[0]); err != nil {
		return 0, 0, err
	}
	if hi, err = strconv.Atoi(f[1]); err != nil {
		return 0, 0, err
	}
	return lo, hi, nil
}
