package freeport

import (
	"net"
	"strconv"
	"testing"
)

func TestGetOutsideEphemeralRangeAndBindable(t *testing.T) {
	ports, err := Get(20, TCPAndUDP)
	if err != nil {
		t.Fatal(err)
	}
	elo, ehi, err := ephemeral()
	if err != nil {
		t.Skipf("no ephemeral range to compare with: %v", err)
	}
	seen := map[int]bool{}
	for _, p := range ports {
		if p >= elo && p <= ehi {
			t.Errorf("port %d is inside the ephemeral range %d-%d", p, elo, ehi)
		}
		if seen[p] {
			t.Errorf("port %d handed out twice", p)
		}
		seen[p] = true
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
		l, err := net.Listen("tcp", addr)
		if err != nil {
			t.Errorf("port %d not bindable for TCP: %v", p, err)
			continue
		}
		u, err := net.ListenPacket("udp", addr)
		if err != nil {
			t.Errorf("port %d not bindable for UDP: %v", p, err)
		} else {
			u.Close()
		}
		l.Close()
	}
}

func TestBusyPortIsNotFree(t *testing.T) {
	ports, err := Get(1, TCPAndUDP)
	if err != nil {
		t.Fatal(err)
	}
	p := ports[0]
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
	if !free(p, TCPAndUDP) {
		t.Fatalf("port %d reported busy before anything holds it", p)
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	if free(p, TCP) {
		t.Errorf("port %d reported free while a TCP listener holds it", p)
	}
	l.Close()
	u, err := net.ListenPacket("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if free(p, TCPAndUDP) {
		t.Errorf("port %d reported free for TCP and UDP while a UDP socket holds it", p)
	}
	if !free(p, TCP) {
		t.Errorf("port %d reported busy for TCP while only UDP is held", p)
	}
}
