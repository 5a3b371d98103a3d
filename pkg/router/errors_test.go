package router

import (
	"errors"
	"testing"
)

func gpuPeers() []Peer {
	return []Peer{
		{ID: "node-a", Healthy: true, Pools: map[string]int{"llm": 4, "cpu": 8}, GPUCount: 8, GPUMemoryMiB: 81920,
			GPUModels: []string{"NVIDIA H100 80GB HBM3"}, Labels: map[string]string{"zone": "eu", "tier": "gold"}},
		{ID: "node-b", Healthy: true, Pools: map[string]int{"llm": 2, "cpu": 8}, GPUCount: 2, GPUMemoryMiB: 40960,
			GPUModels: []string{"NVIDIA A100-PCIE-40GB"}, Labels: map[string]string{"zone": "us"}},
		{ID: "node-c", Healthy: true, Pools: map[string]int{"cpu": 16}, Labels: map[string]string{"zone": "us"}},
	}
}

func TestRankConstraints(t *testing.T) {
	tests := []struct {
		name    string
		peers   func([]Peer) // edits the default fleet
		pool    string
		need    Constraints
		exclude []NodeID
		want    []NodeID // possible owners, in any order
		wantErr string
		is      error // errors.Is target, or nil for *UnsatisfiableError
	}{
		{name: "no constraint", pool: "cpu", want: []NodeID{"node-a", "node-b", "node-c"}},
		{name: "gpu", pool: "cpu", need: Constraints{GPU: true}, want: []NodeID{"node-a", "node-b"}},
		{name: "memory", pool: "llm", need: Constraints{MinGPUMemoryMiB: 80 << 10}, want: []NodeID{"node-a"}},
		{name: "model ignores case", pool: "llm", need: Constraints{GPUModel: "nvidia a100-pcie-40gb"}, want: []NodeID{"node-b"}},
		{name: "labels", pool: "cpu", need: Constraints{Labels: map[string]string{"zone": "us"}}, want: []NodeID{"node-b", "node-c"}},
		{name: "labels all must match", pool: "cpu", need: Constraints{Labels: map[string]string{"zone": "eu", "tier": "gold"}}, want: []NodeID{"node-a"}},
		{
			name: "memory unmet", pool: "llm", need: Constraints{MinGPUMemoryMiB: 80 << 10},
			peers:   func(ps []Peer) { ps[0].GPUMemoryMiB = 24 << 10 },
			wantErr: `no peer satisfies gpu_memory_min=80GiB for pool "llm" (best: node-b has 40GiB)`,
		},
		{
			name: "gpu unmet", pool: "cpu", need: Constraints{GPU: true},
			peers:   func(ps []Peer) { ps[0].GPUCount, ps[1].GPUCount = 0, 0 },
			wantErr: `no peer satisfies gpu for pool "cpu" (none of the 3 peers serving it has a GPU)`,
		},
		{
			name: "model unmet", pool: "llm", need: Constraints{GPUModel: "L4"},
			wantErr: `no peer satisfies gpu_model="L4" for pool "llm" (have: NVIDIA H100 80GB HBM3 on node-a; NVIDIA A100-PCIE-40GB on node-b)`,
		},
		{
			name: "label unmet", pool: "cpu", need: Constraints{Labels: map[string]string{"zone": "ap"}},
			peers:   func(ps []Peer) { delete(ps[2].Labels, "zone") },
			wantErr: `no peer satisfies labels[zone]="ap" for pool "cpu" (have: zone="eu" on node-a; zone="us" on node-b; no zone on node-c)`,
		},
		{
			name: "constraints met only jointly fail on the later one", pool: "llm",
			need:    Constraints{MinGPUMemoryMiB: 40 << 10, Labels: map[string]string{"zone": "ap"}},
			wantErr: `no peer satisfies labels[zone]="ap" for pool "llm" (have: zone="eu" on node-a; zone="us" on node-b)`,
		},
		{
			name: "memory in MiB", pool: "llm", need: Constraints{MinGPUMemoryMiB: 100000},
			wantErr: `no peer satisfies gpu_memory_min=100000MiB for pool "llm" (best: node-a has 80GiB)`,
		},
		{
			name: "unknown pool", pool: "nope", is: ErrUnknownPool,
			wantErr: `unknown pool "nope" (known: cpu, llm)`,
		},
		{
			name: "only match unhealthy is unavailable, not unsatisfiable", pool: "llm", need: Constraints{MinGPUMemoryMiB: 80 << 10},
			peers: func(ps []Peer) { ps[0].Healthy = false }, is: ErrNoPeers,
			wantErr: `no available peer for pool "llm": node-a unhealthy`,
		},
		{
			name: "every state named", pool: "cpu", exclude: []NodeID{"node-c"}, is: ErrNoPeers,
			peers:   func(ps []Peer) { ps[0].Cordoned = true; ps[1].Draining = true },
			wantErr: `no available peer for pool "cpu": node-a cordoned, node-b draining, node-c excluded`,
		},
		{
			name: "no slots", pool: "llm", is: ErrNoPeers,
			peers:   func(ps []Peer) { ps[0].Pools["llm"] = 0; ps[1].Pools["llm"] = 0 },
			wantErr: `no available peer for pool "llm": node-a no slots, node-b no slots`,
		},
		{
			name: "incompatible protocol", pool: "llm", is: ErrNoPeers,
			peers: func(ps []Peer) {
				ps[2].ProtoMin, ps[2].ProtoMax = 1, 1 // node-c is local
				ps[0].ProtoMin, ps[0].ProtoMax = 2, 3
				ps[1].ProtoMin, ps[1].ProtoMax = 2, 2
			},
			wantErr: `no available peer for pool "llm": node-a protocol 2-3, local 1-1, node-b protocol 2-2, local 1-1`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			peers := gpuPeers()
			if tt.peers != nil {
				tt.peers(peers)
			}
			tb := mustTable(t, peers, "node-c")
			for i, sessionless := range []bool{false, true} {
				req := Request{Pool: tt.pool, Need: tt.need, Exclude: tt.exclude, Max: 3, Rand: 42}
				if !sessionless {
					req.SessionID = "s-1"
				}
				got, err := tb.Rank(req, nil, nil)
				if tt.wantErr != "" {
					if err == nil || err.Error() != tt.wantErr {
						t.Fatalf("Rank(%+v) error = %v, want %s", req, err, tt.wantErr)
					}
					var ue *UnsatisfiableError
					if tt.is != nil && !errors.Is(err, tt.is) || tt.is == nil && !errors.As(err, &ue) {
						t.Fatalf("Rank error %v: want errors.Is %v (nil: an *UnsatisfiableError)", err, tt.is)
					}
					if len(got) != 0 {
						t.Fatalf("Rank returned %v with an error", ids(got))
					}
					continue
				}
				if err != nil {
					t.Fatalf("Rank(%+v): %v", req, err)
				}
				if !sameSet(ids(got), tt.want) {
					t.Errorf("Rank(%+v) (case %d) = %v, want the peers %v", req, i, ids(got), tt.want)
				}
			}
		})
	}
}

func sameSet(a, b []NodeID) bool {
	if len(a) != len(b) {
		return false
	}
	m := map[NodeID]bool{}
	for _, x := range a {
		m[x] = true
	}
	for _, x := range b {
		if !m[x] {
			return false
		}
	}
	return true
}

func TestRankEmptyTable(t *testing.T) {
	tb := mustTable(t, nil, "")
	_, err := tb.Rank(Request{SessionID: "s", Pool: "p"}, nil, nil)
	if !errors.Is(err, ErrNoPeers) {
		t.Fatalf("Rank on an empty table: %v, want ErrNoPeers", err)
	}
	if _, err := tb.Owner(Request{Pool: "p"}); !errors.Is(err, ErrNoPeers) {
		t.Fatalf("Owner on an empty table: %v, want ErrNoPeers", err)
	}
}
