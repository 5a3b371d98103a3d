package edge

import (
	"context"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// ClusterStatus asks every node the cluster view lists (the cluster
// layer's last snapshot) for its status, in parallel, each within
// Config.ClusterStatusTimeout, and adds them up. A node that does not answer
// gets a row with the error.
func (a *adminService) ClusterStatus(ctx context.Context, _ *snakepitv1.ClusterStatusRequest) (*snakepitv1.ClusterStatusResponse, error) {
	return a.clusterStatus(ctx, true)
}

func (a *adminService) clusterStatus(ctx context.Context, withPeers bool) (*snakepitv1.ClusterStatusResponse, error) {
	self, err := (&service{Server: a.Server}).Status(ctx, &snakepitv1.StatusRequest{})
	if err != nil {
		return nil, err
	}
	var peers map[string]string
	if withPeers {
		peers = a.d.Cluster.PeerAddrs()
	}
	rows := []*snakepitv1.NodeStatus{{NodeId: a.cfg.NodeID, Address: a.advertised(), Status: self}}
	var mu sync.Mutex
	var wg sync.WaitGroup
	creds := a.d.PeerCreds
	for id, addr := range peers {
		if id == a.cfg.NodeID {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			row := &snakepitv1.NodeStatus{NodeId: id, Address: addr}
			st, err := peerStatus(ctx, addr, creds, a.cfg.ClusterStatusTimeout)
			if err != nil {
				row.Error = err.Error()
			}
			row.Status = st
			mu.Lock()
			rows = append(rows, row)
			mu.Unlock()
		}()
	}
	wg.Wait()
	slices.SortFunc(rows[1:], func(x, y *snakepitv1.NodeStatus) int {
		if x.GetNodeId() < y.GetNodeId() {
			return -1
		}
		return 1
	})
	out := &snakepitv1.ClusterStatusResponse{Nodes: rows, Totals: &snakepitv1.ClusterTotals{}}
	t := out.Totals
	for _, r := range rows {
		t.Nodes++
		if r.GetStatus() == nil {
			continue
		}
		t.Reachable++
		for _, p := range r.GetStatus().GetPools() {
			t.Workers += p.GetSize()
			t.ReadyWorkers += p.GetReadyWorkers()
			t.Busy += p.GetBusy()
			t.Queued += p.GetQueued()
			t.Served += p.GetServed()
			t.Errors += p.GetErrors()
			for _, w := range p.GetWorkers() {
				t.Sessions += w.GetSessions()
			}
		}
	}
	return out, nil
}

func peerStatus(ctx context.Context, addr string, creds credentials.TransportCredentials, timeout time.Duration) (*snakepitv1.StatusResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	opt := grpc.WithTransportCredentials(insecure.NewCredentials())
	if creds != nil {
		opt = grpc.WithTransportCredentials(creds)
	}
	cc, err := grpc.NewClient("passthrough:///"+addr, opt)
	if err != nil {
		return nil, err
	}
	defer cc.Close()
	return snakepitv1.NewSnakepitClient(cc).Status(ctx, &snakepitv1.StatusRequest{})
}

// Status reports this node as a one-row cluster status, or every node with
// req.Cluster.
func (a *adminService) Status(ctx context.Context, req *snakepitv1.AdminStatusRequest) (*snakepitv1.ClusterStatusResponse, error) {
	if req.GetCluster() {
		return a.ClusterStatus(ctx, &snakepitv1.ClusterStatusRequest{})
	}
	return a.clusterStatus(ctx, false)
}

// ListSessions is the public ListSessions, offered on the Admin service too.
func (a *adminService) ListSessions(ctx context.Context, req *snakepitv1.ListSessionsRequest) (*snakepitv1.ListSessionsResponse, error) {
	return (&service{Server: a.Server}).ListSessions(ctx, req)
}
