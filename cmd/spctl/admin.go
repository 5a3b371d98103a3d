package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/snakepit/snakepit/pkg/client"
	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

// dialAdmin connects for an admin verb: over TCP with a bearer token when
// --addr (or $SNAKEPIT_ADDR) names a node, else over the local admin socket.
func (g *globalOpts) dialAdmin(ctx context.Context) (*client.Conn, context.Context, error) {
	if g.addr != "" || os.Getenv(client.EnvAddress) != "" {
		tokenFile := g.tokenFile
		if tokenFile == "" {
			tokenFile = os.Getenv(client.EnvTokenFile)
		}
		c, _, err := g.dial()
		if err != nil {
			return nil, nil, err
		}
		if tokenFile != "" {
			b, err := os.ReadFile(tokenFile)
			if err != nil {
				c.Close()
				return nil, nil, usageError{fmt.Errorf("--token-file: %w", err)}
			}
			ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+strings.TrimSpace(string(b)))
		}
		return c, ctx, nil
	}
	path := client.AdminSocket(g.adminSocket)
	if _, err := os.Stat(path); err != nil {
		return nil, nil, fmt.Errorf("no admin socket at %s (%v): run spctl on the node's host (as a member of its admin_socket_group), pass --admin-socket, or use --addr with --token-file", path, err)
	}
	c, err := client.Dial("unix://" + path)
	return c, ctx, err
}

func newCordonCmd(g *globalOpts, cordon bool) *cobra.Command {
	use, short := "cordon", "Stop routing new sessions and sessionless calls to the node (persists across restarts)"
	if !cordon {
		use, short = "uncordon", "Let the node take routed work again (clears cordon and drain)"
	}
	return &cobra.Command{
		Use:   use,
		Short: short,
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
			defer cancel()
			c, ctx, err := g.dialAdmin(ctx)
			if err != nil {
				return err
			}
			defer c.Close()
			var in *snakepitv1.IntentResponse
			if cordon {
				r, err := c.Admin.Cordon(ctx, &snakepitv1.CordonRequest{})
				if err != nil {
					return err
				}
				in = r.GetIntent()
			} else {
				r, err := c.Admin.Uncordon(ctx, &snakepitv1.UncordonRequest{})
				if err != nil {
					return err
				}
				in = r.GetIntent()
			}
			if g.output == "json" {
				return printJSON(cmd, in)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "cordoned: %t  draining: %t\n", in.GetCordoned(), in.GetDraining())
			return nil
		},
	}
}

func newResizeCmd(g *globalOpts) *cobra.Command {
	var deadline time.Duration
	cmd := &cobra.Command{
		Use:     "resize POOL SIZE",
		Short:   "Change a pool's worker count (shrinking retires idle workers first)",
		Example: "  spctl resize default 8\n  spctl resize default 2 --deadline 2m",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 2 {
				return usageError{fmt.Errorf("resize takes POOL and SIZE (got %d arguments)", len(args))}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			var size uint32
			if _, err := fmt.Sscanf(args[1], "%d", &size); err != nil || fmt.Sprint(size) != args[1] {
				return usageError{fmt.Errorf("SIZE must be a positive whole number (got %q)", args[1])}
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
			defer cancel()
			c, ctx, err := g.dialAdmin(ctx)
			if err != nil {
				return err
			}
			defer c.Close()
			r, err := c.Admin.Resize(ctx, &snakepitv1.ResizeRequest{Pool: args[0], Size: size, Deadline: durationpb.New(deadline)})
			if err != nil {
				return err
			}
			if g.output == "json" {
				return printJSON(cmd, r)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "pool %s: %d -> %d workers\n", r.GetPool(), r.GetPreviousSize(), r.GetSize())
			return nil
		},
	}
	cmd.Flags().DurationVar(&deadline, "deadline", 0, "how long retired busy workers may finish their calls (default: the pool's recycle_drain_timeout)")
	return cmd
}

func newWorkersCmd(g *globalOpts) *cobra.Command {
	var pool string
	cmd := &cobra.Command{
		Use:   "workers",
		Short: "List the node's workers",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
			defer cancel()
			c, ctx, err := g.dialAdmin(ctx)
			if err != nil {
				return err
			}
			defer c.Close()
			r, err := c.Admin.ListWorkers(ctx, &snakepitv1.ListWorkersRequest{Pool: pool})
			if err != nil {
				return err
			}
			if g.output == "json" {
				return printJSON(cmd, r)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "POOL\tWORKER\tGENERATION\tPID\tSTATE\tIN-FLIGHT\tSERVED\tSESSIONS\tGPUS\tAGE")
			for _, pw := range r.GetWorkers() {
				w := pw.GetWorker()
				age := "-"
				if w.GetStarted() != nil {
					age = time.Since(w.GetStarted().AsTime()).Round(time.Second).String()
				}
				gpus := strings.Join(w.GetGpuUuids(), ",")
				if gpus == "" {
					gpus = "-"
				}
				fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%s\t%d/%d\t%d\t%d\t%s\t%s\n", pw.GetPool(), w.GetId(), w.GetGeneration(), w.GetPid(),
					w.GetState(), w.GetInFlight(), w.GetCapacity(), w.GetServed(), w.GetSessions(), gpus, age)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&pool, "pool", "", "only this pool")
	return cmd
}

// version is stamped at build time (make build).
var version = "dev"

func newVersionCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print spctl's version and the node's",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "spctl %s\n", version)
			c, addr, err := g.dial()
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
			defer cancel()
			st, err := c.Snakepit.Status(ctx, &snakepitv1.StatusRequest{})
			if err != nil {
				fmt.Fprintf(out, "node at %s: unreachable\n", addr)
				return err
			}
			fmt.Fprintf(out, "snakepitd %s (node %s at %s)\n", st.GetVersion(), st.GetNodeId(), addr)
			return nil
		},
	}
}
