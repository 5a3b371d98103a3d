package agent

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/snakepit/snakepit/pkg/client"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

func adminOverSocket(t *testing.T, cfg Config) snakepitv1.AdminClient {
	t.Helper()
	c, err := client.Dial("unix://" + AdminSocketPath(cfg))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return snakepitv1.NewAdminClient(c)
}

func TestAdminOverTCPNeedsToken(t *testing.T) {
	token := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(token, []byte("s3cret-token-of-enough-length\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t)
	cfg.AdminTokenFile = token
	tn := startNode(t, cfg)
	admin := snakepitv1.NewAdminClient(tn.conn)
	ctx := context.Background()
	if _, err := admin.Cordon(ctx, &snakepitv1.CordonRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("Cordon over TCP without a token = %v, want PERMISSION_DENIED", err)
	}
	bad := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer wrong-token-of-enough-length")
	if _, err := admin.Cordon(bad, &snakepitv1.CordonRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("Cordon with a wrong token = %v, want PERMISSION_DENIED", err)
	}
	good := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer s3cret-token-of-enough-length")
	resp, err := admin.Cordon(good, &snakepitv1.CordonRequest{})
	if err != nil || !resp.GetIntent().GetCordoned() {
		t.Fatalf("Cordon with the token = %v, %v", resp, err)
	}
	// Execute never needs it.
	if _, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "noop"}); err != nil {
		t.Fatal(err)
	}
}

func TestAdminOverTCPWithoutTokenFileIsRefused(t *testing.T) {
	tn := startNode(t, testConfig(t))
	_, err := snakepitv1.NewAdminClient(tn.conn).Resize(context.Background(), &snakepitv1.ResizeRequest{Pool: "test", Size: 3})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("Resize over TCP = %v, want PERMISSION_DENIED", err)
	}
}

func TestCordonSurvivesRestart(t *testing.T) {
	cfg := testConfig(t)
	tn := startNode(t, cfg)
	admin := adminOverSocket(t, cfg)
	ctx := context.Background()
	if _, err := admin.Cordon(ctx, &snakepitv1.CordonRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Resize(ctx, &snakepitv1.ResizeRequest{Pool: "test", Size: 3}); err != nil {
		t.Fatal(err)
	}
	if err := tn.stop(); err != nil {
		t.Fatal(err)
	}
	tn2 := startNode(t, cfg) // same state_dir
	in, err := adminOverSocket(t, cfg).Intent(ctx, &snakepitv1.IntentRequest{})
	if err != nil || !in.GetCordoned() || in.GetPoolSizes()["test"] != 3 {
		t.Fatalf("intent after restart = %v, %v; want cordoned and test=3", in, err)
	}
	waitStatus(t, tn2, func(p *snakepitv1.PoolStatus) bool { return p.GetSize() == 3 && p.GetReadyWorkers() == 3 })
	if _, err := adminOverSocket(t, cfg).Uncordon(ctx, &snakepitv1.UncordonRequest{}); err != nil {
		t.Fatal(err)
	}
}

func TestResizeUnderLoadFailsNoCall(t *testing.T) {
	cfg := testConfig(t, toolsPool(t, func(pc *PoolConfig) { pc.Size = 2 }))
	tn := startNode(t, cfg)
	admin := adminOverSocket(t, cfg)
	ctx := context.Background()
	stop := make(chan struct{})
	var calls, failed atomic.Int64
	var wg sync.WaitGroup
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				_, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "nap", Args: []byte(`{"seconds": 0.005}`)})
				calls.Add(1)
				if err != nil {
					failed.Add(1)
					t.Errorf("call during resize: %v", err)
				}
			}
		}()
	}
	for _, size := range []uint32{5, 1, 4, 2} {
		resp, err := admin.Resize(ctx, &snakepitv1.ResizeRequest{Pool: "test", Size: size, Deadline: nil})
		if err != nil || resp.GetSize() != size {
			t.Fatalf("Resize(%d) = %v, %v", size, resp, err)
		}
		waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool {
			return p.GetSize() == size && p.GetReadyWorkers() == size && len(p.GetWorkers()) == int(size)
		})
	}
	close(stop)
	wg.Wait()
	if failed.Load() > 0 || calls.Load() == 0 {
		t.Fatalf("%d of %d calls failed during resizes", failed.Load(), calls.Load())
	}
	w, err := admin.ListWorkers(ctx, &snakepitv1.ListWorkersRequest{Pool: "test"})
	if err != nil || len(w.GetWorkers()) != 2 {
		t.Fatalf("ListWorkers = %v, %v; want 2", w, err)
	}
}

func TestResizeBadInput(t *testing.T) {
	cfg := testConfig(t)
	startNode(t, cfg)
	admin := adminOverSocket(t, cfg)
	for _, tt := range []struct {
		req  *snakepitv1.ResizeRequest
		code codes.Code
	}{
		{&snakepitv1.ResizeRequest{Pool: "test", Size: 0}, codes.InvalidArgument},
		{&snakepitv1.ResizeRequest{Pool: "test", Size: 1 << 20}, codes.InvalidArgument},
		{&snakepitv1.ResizeRequest{Pool: "nope", Size: 2}, codes.NotFound},
	} {
		if _, err := admin.Resize(context.Background(), tt.req); status.Code(err) != tt.code {
			t.Errorf("Resize(%v) = %v, want %s", tt.req, err, tt.code)
		}
	}
}

func TestAdminSocketIsPrivate(t *testing.T) {
	cfg := testConfig(t)
	startNode(t, cfg)
	st, err := os.Stat(AdminSocketPath(cfg))
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o660 {
		t.Fatalf("admin socket mode %v, want 0660", st.Mode().Perm())
	}
	// A second daemon on the same state directory refuses to start.
	errc := make(chan error, 1)
	go func() { errc <- Serve(context.Background(), cfg, zerolog.Nop(), Hooks{}) }()
	select {
	case err := <-errc:
		if err == nil || !strings.Contains(err.Error(), "in use by another running snakepitd") {
			t.Fatalf("second daemon = %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("second daemon on the same state dir did not fail")
	}
}

func TestClusterStatus(t *testing.T) {
	cfg := testConfig(t)
	tn := startNode(t, cfg)
	tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "noop"})
	admin := adminOverSocket(t, cfg)
	// Standalone: just this node.
	st, err := admin.ClusterStatus(context.Background(), &snakepitv1.ClusterStatusRequest{})
	if err != nil || len(st.GetNodes()) != 1 || st.GetTotals().GetReachable() != 1 || st.GetTotals().GetServed() != 1 || st.GetTotals().GetWorkers() != 2 {
		t.Fatalf("ClusterStatus standalone = %v, %v", st, err)
	}
	if st.GetNodes()[0].GetAddress() != tn.addr {
		t.Errorf("own address = %q, want %q", st.GetNodes()[0].GetAddress(), tn.addr)
	}
}

func TestAdminStatusAndSessions(t *testing.T) {
	cfg := testConfig(t)
	tn := startNode(t, cfg)
	tally(t, tn, "s1", 0)
	admin := adminOverSocket(t, cfg)
	st, err := admin.Status(context.Background(), &snakepitv1.AdminStatusRequest{})
	if err != nil || len(st.GetNodes()) != 1 || st.GetTotals().GetSessions() != 1 {
		t.Fatalf("Admin.Status = %v, %v; want this node with its session", st, err)
	}
	ls, err := admin.ListSessions(context.Background(), &snakepitv1.ListSessionsRequest{})
	if err != nil || len(ls.GetSessions()) != 1 || ls.GetSessions()[0].GetSessionId() != "s1" {
		t.Fatalf("Admin.ListSessions = %v, %v", ls, err)
	}
}
