package edge

import (
	"context"
	"crypto/subtle"

	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/snakepit/snakepit/pkg/agent/call"
	"github.com/snakepit/snakepit/pkg/agent/engine"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// adminService implements snakepit.v1.Admin.
type adminService struct {
	snakepitv1.UnimplementedAdminServer
	*Server
}

func intentProto(in engine.Intent) *snakepitv1.IntentResponse {
	out := &snakepitv1.IntentResponse{Cordoned: in.Cordoned, Draining: in.Draining, PoolSizes: map[string]uint32{}}
	for k, v := range in.PoolSizes {
		out.PoolSizes[k] = uint32(v)
	}
	if !in.Updated.IsZero() {
		out.Updated = timestamppb.New(in.Updated)
	}
	return out
}

func (a *adminService) Cordon(context.Context, *snakepitv1.CordonRequest) (*snakepitv1.CordonResponse, error) {
	in, err := a.d.Engine.Cordon()
	if err != nil {
		return nil, toStatus(err)
	}
	return &snakepitv1.CordonResponse{Intent: intentProto(in)}, nil
}

func (a *adminService) Uncordon(context.Context, *snakepitv1.UncordonRequest) (*snakepitv1.UncordonResponse, error) {
	in, err := a.d.Engine.Uncordon()
	if err != nil {
		return nil, toStatus(err)
	}
	return &snakepitv1.UncordonResponse{Intent: intentProto(in)}, nil
}

func (a *adminService) Intent(context.Context, *snakepitv1.IntentRequest) (*snakepitv1.IntentResponse, error) {
	return intentProto(a.d.Engine.Intent()), nil
}

func (a *adminService) Drain(in *snakepitv1.DrainRequest, stream grpc.ServerStreamingServer[snakepitv1.DrainProgress]) error {
	if in.GetDryRun() {
		out := &snakepitv1.DrainProgress{}
		// Where each session would go: the cluster layer's ranking without
		// this node ("" when no other node serves its pool).
		sessions, _ := a.d.Engine.Sessions("")
		for _, s := range sessions {
			out.Moves = append(out.Moves, &snakepitv1.SessionMove{SessionId: s.ID, Pool: s.Pool, NextNode: a.d.Cluster.NextOwner(s.Pool, s.ID)})
		}
		st := a.d.Engine.DrainState()
		out.InFlight, out.Queued, out.Sessions = uint32(st.InFlight), uint32(st.Queued), uint32(st.Sessions)
		return stream.Send(out)
	}
	err := a.d.Engine.Drain(stream.Context(), in.GetDeadline().AsDuration(), func(p engine.DrainProgress) error {
		return stream.Send(&snakepitv1.DrainProgress{
			InFlight: uint32(p.InFlight), Queued: uint32(p.Queued), Sessions: uint32(p.Sessions),
			Remaining: durationpb.New(p.Remaining), Drained: p.Drained, Cancelled: uint32(p.Cancelled),
		})
	})
	if err != nil {
		return toStatus(err)
	}
	return nil
}

func (a *adminService) Resize(_ context.Context, in *snakepitv1.ResizeRequest) (*snakepitv1.ResizeResponse, error) {
	name := in.GetPool()
	if name == "" {
		name = a.d.Engine.DefaultPool()
	}
	prev, err := a.d.Engine.Resize(name, int(in.GetSize()), in.GetDeadline().AsDuration())
	if err != nil {
		return nil, toStatus(err)
	}
	return &snakepitv1.ResizeResponse{Pool: name, PreviousSize: uint32(prev), Size: in.GetSize()}, nil
}

func (a *adminService) ListWorkers(_ context.Context, in *snakepitv1.ListWorkersRequest) (*snakepitv1.ListWorkersResponse, error) {
	st, err := (&service{Server: a.Server}).Status(context.Background(), &snakepitv1.StatusRequest{})
	if err != nil {
		return nil, err
	}
	if in.GetPool() != "" {
		if _, ok := a.d.Engine.Pool(in.GetPool()); !ok {
			return nil, toStatus(&call.UnknownPoolError{Pool: in.GetPool(), Known: a.d.Engine.Pools()})
		}
	}
	out := &snakepitv1.ListWorkersResponse{}
	for _, p := range st.GetPools() {
		if in.GetPool() != "" && p.GetName() != in.GetPool() {
			continue
		}
		for _, w := range p.GetWorkers() {
			out.Workers = append(out.Workers, &snakepitv1.PoolWorker{Pool: p.GetName(), Worker: w})
		}
	}
	return out, nil
}

// adminAuth guards the Admin service on the TCP port: a caller must present
// a verified client certificate whose common name or DNS name is one of
// admin_identities, or the bearer token from admin_token_file; otherwise
// admin verbs are served on the local socket only. Other services pass.
func adminAuth(tokenFile string, identities []string) (grpc.UnaryServerInterceptor, error) {
	var token []byte
	if tokenFile != "" {
		b, err := os.ReadFile(tokenFile)
		if err != nil {
			return nil, fmt.Errorf("admin_token_file: %w", err)
		}
		token = []byte(strings.TrimSpace(string(b)))
		if len(token) < 16 {
			return nil, fmt.Errorf("admin_token_file %s: the token must be at least 16 characters (got %d)", tokenFile, len(token))
		}
	}
	prefix := "/" + snakepitv1.Admin_ServiceDesc.ServiceName + "/"
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if !strings.HasPrefix(info.FullMethod, prefix) {
			return handler(ctx, req)
		}
		p, _ := peer.FromContext(ctx)
		if isAdmin(p, identities) {
			return handler(ctx, req)
		}
		if token == nil {
			presented := ""
			if ids := callerIdentities(p); len(ids) > 0 {
				presented = fmt.Sprintf("the client certificate %q is not listed in admin_identities; ", ids[0])
			}
			return nil, status.Error(codes.PermissionDenied, presented+"admin verbs are served on the node's local admin socket (admin_socket); over TCP they need a client certificate listed in admin_identities, or admin_token_file set on the node and the token sent as a bearer token")
		}
		for _, v := range metadata.ValueFromIncomingContext(ctx, "authorization") {
			if got, ok := strings.CutPrefix(v, "Bearer "); ok && subtle.ConstantTimeCompare([]byte(got), token) == 1 {
				return handler(ctx, req)
			}
		}
		return nil, status.Error(codes.PermissionDenied, "admin verb without a valid bearer token (spctl --token-file)")
	}, nil
}

// listenAdminSocket binds the local admin socket: mode 0660, group
// admin_socket_group when set. A stale socket file of a dead daemon is
// replaced; one in use by a running daemon is an error.
func listenAdminSocket(path, group string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("admin_socket %s: %w", path, err)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("admin_socket %s is in use by another running snakepitd (two daemons must not share a state directory)", path)
	}
	_ = os.Remove(path)
	lis, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("admin_socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		lis.Close()
		return nil, fmt.Errorf("admin_socket %s: %w", path, err)
	}
	if group != "" {
		g, err := user.LookupGroup(group)
		if err != nil {
			lis.Close()
			return nil, fmt.Errorf("admin_socket_group %q: %w", group, err)
		}
		gid, _ := strconv.Atoi(g.Gid)
		if err := os.Chown(path, -1, gid); err != nil {
			lis.Close()
			return nil, fmt.Errorf("admin_socket_group %q: %w", group, err)
		}
	}
	return lis, nil
}
