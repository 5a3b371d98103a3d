package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// The process-level check of GPU placement (docs/hardware.md, "Testing
// without a GPU"). This host has no GPU, so node gpu-a runs a test build of
// snakepitd (go build -tags nvmlmock) with SNAKEPIT_NVML_MOCK=dgxa100: its
// hw.Detect answers with go-nvml's DGX A100 mock, cut to two GPUs. Nodes
// cpu-b and cpu-c run the release build; cpu-c gets the mock's variables
// too, which a release build ignores.

const (
	gpuClusterTTL   = 5 * time.Second
	mockGPUModel    = "Mock NVIDIA A100-SXM4-40GB"
	mockGPUMemory   = 40 << 30 // bytes, per mock GPU
	mockUUIDPrefix  = "GPU-6d6f636b-0000-4000-8000-"
	gpuNodePools    = "  - name: default\n    adapter: snakepit_examples.example\n    size: 1\n  - name: gpu\n    adapter: snakepit_examples.example\n    size: 2\n    gpus:\n      per_worker: 1\n"
	mockEnvVar      = "SNAKEPIT_NVML_MOCK=dgxa100"
	mockGPUsEnvVar  = "SNAKEPIT_NVML_MOCK_GPUS=2"
	gpuCallDeadline = 10 * time.Second
)

// buildMockDaemon builds the test build of snakepitd, whose hw.Detect can
// use go-nvml's mock.
func buildMockDaemon(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "snakepitd-nvmlmock")
	cmd := exec.Command("go", "build", "-tags", "nvmlmock", "-o", bin, "../../cmd/snakepitd")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build -tags nvmlmock: %v\n%s", err, out)
	}
	return bin
}

// startClusterNodeEnv is startClusterNode with extra environment variables;
// stderr reads the node's log so far.
func startClusterNodeEnv(t *testing.T, bin, id, cfg string, env ...string) (n *clusterNode, stderr func() string) {
	t.Helper()
	d, _ := launchNode(t, bin, id, cfg, t.TempDir(), env...)
	return &clusterNode{daemonProc: d, id: id, conn: dialServing(t, d.addr)}, d.out.String
}

// procEnv returns the environment of process pid.
func procEnv(t *testing.T, pid int32) map[string]string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		t.Fatalf("environment of worker %d: %v", pid, err)
	}
	env := map[string]string{}
	for _, kv := range strings.Split(string(b), "\x00") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
	}
	return env
}

// poolWorkers returns the workers of pool on node n, by worker id.
func poolWorkers(t *testing.T, n *clusterNode, pool string) map[uint64]*snakepitv1.WorkerStatus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := n.conn.Snakepit.Status(ctx, &snakepitv1.StatusRequest{})
	if err != nil {
		t.Fatalf("status of %s: %v", n.id, err)
	}
	out := map[uint64]*snakepitv1.WorkerStatus{}
	for _, p := range st.GetPools() {
		if p.GetName() == pool {
			for _, w := range p.GetWorkers() {
				out[w.GetId()] = w
			}
		}
	}
	return out
}

func TestGPUConstraintsCluster(t *testing.T) {
	bin, ctl, agent := skipUnlessCluster(t)
	mockBin := buildMockDaemon(t)

	// The release build ignores the mock's variables: a GPU pool cannot
	// start, and the error names the key.
	t.Run("release build ignores SNAKEPIT_NVML_MOCK", func(t *testing.T) {
		dir := t.TempDir()
		cfg := filepath.Join(dir, "c.yaml")
		if err := os.WriteFile(cfg, []byte("pools:\n"+gpuNodePools), 0o644); err != nil {
			t.Fatal(err)
		}
		d := startDaemonEnv(t, bin, dir, []string{mockEnvVar, mockGPUsEnvVar}, "--config", cfg)
		stderr := d.out.String
		select {
		case err := <-d.exited:
			d.exited <- err
			s := stderr()
			if err == nil || !strings.Contains(s, "pools[gpu].gpus.per_worker=1 but this host has no GPU") || strings.Contains(s, "MOCK") {
				t.Fatalf("release snakepitd with %s and a GPU pool: exit %v\n%s\nwant a failure naming pools[gpu].gpus.per_worker and no mock", mockEnvVar, err, s)
			}
		case <-time.After(60 * time.Second):
			t.Fatal("release snakepitd with a GPU pool and no GPU did not exit within 60s")
		}
	})

	a, aLog := startClusterNodeEnv(t, mockBin, "gpu-a", clusterConfig("gpu-a", agent.Addr, gpuClusterTTL, gpuNodePools), mockEnvVar, mockGPUsEnvVar)
	b := startClusterNode(t, bin, "cpu-b", clusterConfig("cpu-b", agent.Addr, gpuClusterTTL, ""))
	c, cLog := startClusterNodeEnv(t, bin, "cpu-c", clusterConfig("cpu-c", agent.Addr, gpuClusterTTL, ""), mockEnvVar, mockGPUsEnvVar)
	nodes := []*clusterNode{a, b, c}
	for _, n := range nodes {
		waitView(t, n, 30*time.Second, "gpu-a", "cpu-b", "cpu-c")
	}
	if s := aLog(); !strings.Contains(s, "NVML MOCK IN USE") {
		t.Errorf("gpu-a does not log that the NVML mock is in use:\n%s", s)
	}
	if s := cLog(); strings.Contains(s, "MOCK") {
		t.Errorf("cpu-c, a release build, mentions the mock:\n%s", s)
	}

	call := func(entry *clusterNode, req *snakepitv1.ExecuteRequest) (*snakepitv1.ExecuteResponse, error) {
		ctx, cancel := context.WithTimeout(context.Background(), gpuCallDeadline)
		defer cancel()
		return entry.conn.Snakepit.Execute(ctx, req)
	}

	t.Run("nodes list the mock GPUs", func(t *testing.T) {
		for _, n := range []*clusterNode{b, c} {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			resp, err := n.conn.Snakepit.ListNodes(ctx, &snakepitv1.ListNodesRequest{})
			cancel()
			if err != nil {
				t.Fatal(err)
			}
			got := map[string]*snakepitv1.Node{}
			for _, p := range resp.GetNodes() {
				got[p.GetNodeId()] = p
			}
			if g := got["gpu-a"]; g.GetGpuCount() != 2 || !slices.Equal(g.GetGpuModels(), []string{mockGPUModel}) || g.GetGpuMemoryBytes() != 2*mockGPUMemory {
				t.Errorf("%s lists gpu-a with %d GPUs %v, %d bytes; want 2 x %s, 80 GiB", n.id, g.GetGpuCount(), g.GetGpuModels(), g.GetGpuMemoryBytes(), mockGPUModel)
			}
			for _, id := range []string{"cpu-b", "cpu-c"} {
				if got[id].GetGpuCount() != 0 {
					t.Errorf("%s lists %s with %d GPUs, want none", n.id, id, got[id].GetGpuCount())
				}
			}
		}
		out, err := exec.Command(ctl, "--addr", b.addr, "nodes").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "2 x "+mockGPUModel+", 80 GiB") {
			t.Errorf("spctl nodes through cpu-b: %v\n%s\nwant gpu-a with 2 x %s, 80 GiB", err, out, mockGPUModel)
		}
	})

	// Every call to pool gpu, which only gpu-a serves, runs there, whatever
	// the entry node, with and without a session.
	t.Run("pool gpu runs only on gpu-a", func(t *testing.T) {
		for _, entry := range nodes {
			for i := range 20 {
				for _, session := range []string{"", fmt.Sprintf("gpu-%s-%d", entry.id, i)} {
					r, err := call(entry, &snakepitv1.ExecuteRequest{Tool: "noop", Pool: "gpu", SessionId: session})
					if err != nil || r.GetRanOn().GetNodeId() != "gpu-a" || r.GetRanOn().GetPool() != "gpu" {
						t.Fatalf("pool gpu through %s (session %q): ran on %v, %v; want gpu-a", entry.id, session, r.GetRanOn(), err)
					}
				}
			}
		}
	})

	// {gpu: true} confines pool default, which all three serve, to gpu-a;
	// without it, sessions spread over the three.
	t.Run("gpu constraint confines pool default to gpu-a", func(t *testing.T) {
		for _, entry := range nodes {
			for i := range 20 {
				for _, session := range []string{"", fmt.Sprintf("need-gpu-%s-%d", entry.id, i)} {
					r, err := call(entry, &snakepitv1.ExecuteRequest{Tool: "noop", SessionId: session, Constraints: &snakepitv1.Constraints{Gpu: true}})
					if err != nil || r.GetRanOn().GetNodeId() != "gpu-a" {
						t.Fatalf("{gpu: true} through %s (session %q): ran on %v, %v; want gpu-a", entry.id, session, r.GetRanOn(), err)
					}
				}
			}
		}
		ran := map[string]int{}
		for i := range 30 {
			r, err := call(b, &snakepitv1.ExecuteRequest{Tool: "noop", SessionId: fmt.Sprint("any-", i)})
			if err != nil {
				t.Fatalf("unconstrained session any-%d: %v", i, err)
			}
			ran[r.GetRanOn().GetNodeId()]++
		}
		if len(ran) < 2 {
			t.Errorf("30 unconstrained sessions of pool default ran on %v; want them spread", ran)
		}
	})

	// Constraints the mock meets run on gpu-a; constraints no node meets
	// fail through every node with FAILED_PRECONDITION UNSATISFIABLE
	// naming the constraint.
	t.Run("gpu model and memory", func(t *testing.T) {
		for _, entry := range nodes {
			for _, ok := range []*snakepitv1.Constraints{
				{GpuModel: strings.ToLower(mockGPUModel)},
				{GpuModel: strings.ToUpper(mockGPUModel)},
				{MinGpuMemoryBytes: mockGPUMemory},
				{Gpu: true, MinGpuMemoryBytes: 1 << 30, GpuModel: mockGPUModel},
			} {
				for _, pool := range []string{"default", "gpu"} {
					r, err := call(entry, &snakepitv1.ExecuteRequest{Tool: "noop", Pool: pool, Constraints: ok})
					if err != nil || r.GetRanOn().GetNodeId() != "gpu-a" {
						t.Errorf("%v, pool %s, through %s: ran on %v, %v; want gpu-a", ok, pool, entry.id, r.GetRanOn(), err)
					}
				}
			}
			for _, tt := range []struct {
				need *snakepitv1.Constraints
				want string
			}{
				{&snakepitv1.Constraints{GpuModel: "NVIDIA H100 80GB HBM3"}, `gpu_model="NVIDIA H100 80GB HBM3"`},
				{&snakepitv1.Constraints{MinGpuMemoryBytes: 80 << 30}, "gpu_memory_min=80GiB"},
				{&snakepitv1.Constraints{MinGpuMemoryBytes: mockGPUMemory + 1}, "gpu_memory_min=40961MiB"},
			} {
				for _, pool := range []string{"default", "gpu"} {
					r, err := call(entry, &snakepitv1.ExecuteRequest{Tool: "noop", Pool: pool, Constraints: tt.need})
					code, ei := errInfo(err)
					if !isReason(err, codes.FailedPrecondition, "UNSATISFIABLE") || !strings.Contains(err.Error(), tt.want) {
						t.Errorf("%v, pool %s, through %s: ran on %v, %v (%v %v); want FAILED_PRECONDITION UNSATISFIABLE naming %s",
							tt.need, pool, entry.id, r.GetRanOn(), err, code, ei, tt.want)
						continue
					}
					if got := ei.GetMetadata()["constraint"]; got != tt.want {
						t.Errorf("%v through %s: ErrorInfo constraint %q, want %q", tt.need, entry.id, got, tt.want)
					}
				}
			}
		}
	})

	// The worker that runs a gpu call sees exactly its mock GPU in
	// CUDA_VISIBLE_DEVICES; gpu-a's other workers see none.
	t.Run("workers see their mock GPU", func(t *testing.T) {
		workers := poolWorkers(t, a, "gpu")
		if len(workers) != 2 {
			t.Fatalf("gpu-a's pool gpu has %d workers, want 2", len(workers))
		}
		uuids := map[string]bool{}
		for id, w := range workers {
			want := fmt.Sprintf("%s%012x", mockUUIDPrefix, id)
			if !slices.Equal(w.GetGpuUuids(), []string{want}) {
				t.Errorf("worker %d of pool gpu has GPUs %v, want [%s]", id, w.GetGpuUuids(), want)
			}
			uuids[want] = true
		}
		seen := map[uint64]bool{}
		for i := 0; len(seen) < len(workers); i++ {
			if i == 200 {
				t.Fatalf("200 sessions of pool gpu reached workers %v only", seen)
			}
			entry := nodes[i%len(nodes)]
			r, err := call(entry, &snakepitv1.ExecuteRequest{Tool: "whoami", Pool: "gpu", SessionId: fmt.Sprint("who-", i)})
			if err != nil {
				t.Fatalf("whoami through %s: %v", entry.id, err)
			}
			var who struct{ PID int32 }
			if err := json.Unmarshal(r.GetResult(), &who); err != nil {
				t.Fatalf("whoami = %s: %v", r.GetResult(), err)
			}
			wid := r.GetRanOn().GetWorkerId()
			w := poolWorkers(t, a, "gpu")[wid]
			if w == nil || w.GetPid() != who.PID {
				t.Fatalf("whoami ran in pid %d on worker %d; status has %v", who.PID, wid, w)
			}
			env := procEnv(t, who.PID)
			if got := env["CUDA_VISIBLE_DEVICES"]; !slices.Equal([]string{got}, w.GetGpuUuids()) || !uuids[got] {
				t.Errorf("worker %d (pid %d) has CUDA_VISIBLE_DEVICES=%q, want its one mock GPU %v", wid, who.PID, got, w.GetGpuUuids())
			}
			if got := env["NVIDIA_VISIBLE_DEVICES"]; got != env["CUDA_VISIBLE_DEVICES"] {
				t.Errorf("worker %d has NVIDIA_VISIBLE_DEVICES=%q, CUDA_VISIBLE_DEVICES=%q", wid, got, env["CUDA_VISIBLE_DEVICES"])
			}
			seen[wid] = true
		}
		for _, w := range poolWorkers(t, a, "default") {
			if v, set := procEnv(t, w.GetPid())["CUDA_VISIBLE_DEVICES"]; !set || v != "" || len(w.GetGpuUuids()) != 0 {
				t.Errorf("gpu-a's default worker %d: CUDA_VISIBLE_DEVICES=%q (set %v), GPUs %v; want it set empty", w.GetId(), v, set, w.GetGpuUuids())
			}
		}
		for _, n := range []*clusterNode{b, c} {
			for _, w := range poolWorkers(t, n, "default") {
				if v := procEnv(t, w.GetPid())["CUDA_VISIBLE_DEVICES"]; strings.HasPrefix(v, "GPU-") || len(w.GetGpuUuids()) != 0 {
					t.Errorf("%s's worker %d: CUDA_VISIBLE_DEVICES=%q, GPUs %v; want no GPU", n.id, w.GetId(), v, w.GetGpuUuids())
				}
			}
		}
	})
}
