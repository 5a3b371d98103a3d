package main

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

func newStatusCmd(g *globalOpts) *cobra.Command {
	var cluster bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the node's pools, workers and call statistics (--cluster: every node, with totals)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cluster {
				return clusterStatus(cmd, g)
			}
			c, _, err := g.dial()
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
			defer cancel()
			st, err := c.Snakepit.Status(ctx, &snakepitv1.StatusRequest{})
			if err != nil {
				return err
			}
			if g.output == "json" {
				return printJSON(cmd, st)
			}
			out := cmd.OutOrStdout()
			up := ""
			if st.GetStarted() != nil {
				up = time.Since(st.GetStarted().AsTime()).Round(time.Second).String()
			}
			fmt.Fprintf(out, "node %s  version %s  up %s\n\n", st.GetNodeId(), st.GetVersion(), up)
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "POOL\tSTATE\tWORKERS\tBUSY\tQUEUED\tSERVED\tERRORS\tREJECTED\tP50\tP99\tADAPTER")
			for _, p := range st.GetPools() {
				fmt.Fprintf(tw, "%s\t%s\t%d/%d\t%d/%d\t%d/%d\t%d\t%d\t%d\t%s\t%s\t%s\n",
					p.GetName(), stateName(p.GetState()), p.GetReadyWorkers(), p.GetSize(),
					p.GetBusy(), p.GetSize()*p.GetCapacityPerWorker(), p.GetQueued(), p.GetQueueDepth(),
					p.GetServed(), p.GetErrors(), p.GetRejected(),
					dur(p.GetLatency().GetP50()), dur(p.GetLatency().GetP99()), p.GetAdapter())
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			for _, p := range st.GetPools() {
				if p.GetReason() != "" {
					fmt.Fprintf(out, "\npool %s: %s\n", p.GetName(), p.GetReason())
				}
			}
			fmt.Fprintln(out)
			tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "POOL\tWORKER\tGENERATION\tPID\tSTATE\tIN-FLIGHT\tSERVED\tAGE")
			for _, p := range st.GetPools() {
				for _, w := range p.GetWorkers() {
					age := "-"
					if w.GetStarted() != nil {
						age = time.Since(w.GetStarted().AsTime()).Round(time.Second).String()
					}
					fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%s\t%d/%d\t%d\t%s\n", p.GetName(), w.GetId(), w.GetGeneration(), w.GetPid(),
						w.GetState(), w.GetInFlight(), w.GetCapacity(), w.GetServed(), age)
				}
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&cluster, "cluster", false, "ask every node of the cluster (an admin verb: admin socket, or --addr with credentials)")
	return cmd
}

func clusterStatus(cmd *cobra.Command, g *globalOpts) error {
	ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
	defer cancel()
	c, ctx, err := g.dialAdmin(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	st, err := c.Admin.ClusterStatus(ctx, &snakepitv1.ClusterStatusRequest{})
	if err != nil {
		return err
	}
	if g.output == "json" {
		return printJSON(cmd, st)
	}
	tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE	ADDRESS	VERSION	WORKERS	BUSY	QUEUED	SERVED	ERRORS	STATE")
	for _, r := range st.GetNodes() {
		if r.GetStatus() == nil {
			fmt.Fprintf(tw, "%s	%s	-	-	-	-	-	-	unreachable: %s\n", r.GetNodeId(), r.GetAddress(), r.GetError())
			continue
		}
		var size, ready, busy, queued uint32
		var served, errs uint64
		state := "ready"
		for _, p := range r.GetStatus().GetPools() {
			size += p.GetSize()
			ready += p.GetReadyWorkers()
			busy += p.GetBusy()
			queued += p.GetQueued()
			served += p.GetServed()
			errs += p.GetErrors()
			if s := stateName(p.GetState()); s != "ready" {
				state = p.GetName() + " " + s
			}
		}
		fmt.Fprintf(tw, "%s	%s	%s	%d/%d	%d	%d	%d	%d	%s\n", r.GetNodeId(), r.GetAddress(), r.GetStatus().GetVersion(),
			ready, size, busy, queued, served, errs, state)
	}
	t := st.GetTotals()
	fmt.Fprintf(tw, "TOTAL (%d/%d nodes)			%d/%d	%d	%d	%d	%d	%d sessions\n", t.GetReachable(), t.GetNodes(),
		t.GetReadyWorkers(), t.GetWorkers(), t.GetBusy(), t.GetQueued(), t.GetServed(), t.GetErrors(), t.GetSessions())
	return tw.Flush()
}

func stateName(s snakepitv1.PoolState) string {
	switch s {
	case snakepitv1.PoolState_POOL_STATE_STARTING:
		return "starting"
	case snakepitv1.PoolState_POOL_STATE_READY:
		return "ready"
	case snakepitv1.PoolState_POOL_STATE_DEGRADED:
		return "degraded"
	case snakepitv1.PoolState_POOL_STATE_FAILED:
		return "failed"
	case snakepitv1.PoolState_POOL_STATE_STOPPING:
		return "stopping"
	}
	return "unknown"
}

func dur(d *durationpb.Duration) string {
	if d == nil {
		return "-"
	}
	return d.AsDuration().Round(time.Microsecond).String()
}

// printJSON prints a response as the node's proto message in JSON.
func printJSON(cmd *cobra.Command, m proto.Message) error {
	b, err := protojson.MarshalOptions{Multiline: true, Indent: "  ", UseProtoNames: true, EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(cmd.OutOrStdout(), string(b))
	return err
}
