package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

func TestPrintNodes(t *testing.T) {
	resp := &snakepitv1.ListNodesResponse{
		Discovery:   "consul",
		Stale:       true,
		SnapshotAge: durationpb.New(1234 * time.Millisecond),
		Nodes: []*snakepitv1.Node{
			{NodeId: "gpu-1", Address: "10.0.0.1:7420", Healthy: true, Version: "0.4.0", Self: true,
				Pools: map[string]uint32{"train": 2, "default": 4}, GpuCount: 8,
				GpuModels: []string{"NVIDIA A100-SXM4-40GB"}, GpuMemoryBytes: 8 * 40 << 30,
				Labels: map[string]string{"zone": "eu-1a", "rack": "r7"}},
			{NodeId: "cpu-1", Address: "10.0.0.2:7420", Healthy: true, Cordoned: true, Draining: true, Version: "0.3.9"},
		},
	}
	var b bytes.Buffer
	if err := printNodes(&b, resp); err != nil {
		t.Fatal(err)
	}
	want := `NODE     ADDRESS        HEALTHY  CORDONED  VERSION  SLOTS                  GPUS                                LABELS              AGE
gpu-1 *  10.0.0.1:7420  yes      no        0.4.0    6 (default:4,train:2)  8 x NVIDIA A100-SXM4-40GB, 320 GiB  rack=r7,zone=eu-1a  1.2s
cpu-1    10.0.0.2:7420  yes      draining  0.3.9    -                      -                                   -                   1.2s

stale: consul discovery is unreachable from this node; these are the last nodes it knew
`
	if got := b.String(); got != want {
		t.Errorf("printNodes =\n%s\nwant\n%s", got, want)
	}
}

// spctl nodes against a standalone node: a static cluster of one.
func TestSpctlNodes(t *testing.T) {
	addr := startNode(t)
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, out, errOut := spctl(t, "--addr", addr, "nodes")
		if code != 0 {
			t.Fatalf("spctl nodes exit %d: %s", code, errOut)
		}
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if len(lines) == 2 && strings.HasPrefix(lines[0], "NODE") && strings.Contains(lines[1], "node-t *") &&
			strings.Contains(lines[1], addr) && strings.Contains(lines[1], " yes ") && strings.Contains(lines[1], "2 (default:2)") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("spctl nodes never listed node-t healthy:\n%s", out)
		}
		time.Sleep(20 * time.Millisecond)
	}
	code, out, errOut := spctl(t, "--addr", addr, "nodes", "-o", "json")
	if code != 0 {
		t.Fatalf("spctl nodes -o json exit %d: %s", code, errOut)
	}
	var got struct {
		Nodes []struct {
			NodeID  string            `json:"node_id"`
			Address string            `json:"address"`
			Healthy bool              `json:"healthy"`
			Self    bool              `json:"self"`
			Pools   map[string]uint32 `json:"pools"`
		} `json:"nodes"`
		Discovery   string `json:"discovery"`
		SnapshotAge string `json:"snapshot_age"`
	}
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("spctl nodes -o json: %v\n%s", err, out)
	}
	if len(got.Nodes) != 1 || got.Nodes[0].NodeID != "node-t" || !got.Nodes[0].Self || !got.Nodes[0].Healthy ||
		got.Nodes[0].Address != addr || got.Nodes[0].Pools["default"] != 2 || got.Discovery != "static" || got.SnapshotAge == "" {
		t.Errorf("spctl nodes -o json = %+v", got)
	}
}
