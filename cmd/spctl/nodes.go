package main

import (
	"context"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

func newNodesCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "nodes",
		Short: "List the cluster's nodes as this node sees them",
		Long: `List the cluster's nodes as the node at --addr sees them: its discovery
view (Consul, or the static peer list), the node itself marked with *.

SLOTS is worker slots (workers x capacity) over all pools; AGE is how long
ago that view last changed. A stale view (the discovery backend is
unreachable) keeps the last nodes known and says so.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, _, err := g.dial()
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
			defer cancel()
			resp, err := c.Snakepit.ListNodes(ctx, &snakepitv1.ListNodesRequest{})
			if err != nil {
				return err
			}
			if g.output == "json" {
				return printJSON(cmd, resp)
			}
			return printNodes(cmd.OutOrStdout(), resp)
		},
	}
}

// printNodes renders ListNodes as a table.
func printNodes(out io.Writer, resp *snakepitv1.ListNodesResponse) error {
	age := "-"
	if resp.GetSnapshotAge() != nil {
		age = resp.GetSnapshotAge().AsDuration().Round(100 * time.Millisecond).String()
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tADDRESS\tHEALTHY\tCORDONED\tVERSION\tSLOTS\tGPUS\tLABELS\tAGE")
	for _, n := range resp.GetNodes() {
		name := n.GetNodeId()
		if n.GetSelf() {
			name += " *"
		}
		cordoned := yesNo(n.GetCordoned())
		if n.GetDraining() {
			cordoned = "draining"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", name, dash(n.GetAddress()), yesNo(n.GetHealthy()), cordoned,
			dash(n.GetVersion()), slots(n.GetPools()), gpus(n), labels(n.GetLabels()), age)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if resp.GetStale() {
		_, err := fmt.Fprintf(out, "\nstale: %s discovery is unreachable from this node; these are the last nodes it knew\n", resp.GetDiscovery())
		return err
	}
	return nil
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// slots renders a node's worker slots: the total, then per pool.
func slots(pools map[string]uint32) string {
	if len(pools) == 0 {
		return "-"
	}
	var total uint32
	parts := make([]string, 0, len(pools))
	for _, name := range slices.Sorted(maps.Keys(pools)) {
		total += pools[name]
		parts = append(parts, fmt.Sprintf("%s:%d", name, pools[name]))
	}
	return fmt.Sprintf("%d (%s)", total, strings.Join(parts, ","))
}

// gpus renders a node's GPU summary: "8 x NVIDIA A100-SXM4-40GB, 320 GiB".
func gpus(n *snakepitv1.Node) string {
	if n.GetGpuCount() == 0 {
		return "-"
	}
	s := fmt.Sprintf("%d", n.GetGpuCount())
	if m := n.GetGpuModels(); len(m) > 0 {
		s += " x " + strings.Join(m, "+")
	}
	if b := n.GetGpuMemoryBytes(); b > 0 {
		s += fmt.Sprintf(", %d GiB", b>>30)
	}
	return s
}

func labels(l map[string]string) string {
	if len(l) == 0 {
		return "-"
	}
	parts := make([]string, 0, len(l))
	for _, k := range slices.Sorted(maps.Keys(l)) {
		parts = append(parts, k+"="+l[k])
	}
	return strings.Join(parts, ",")
}
