package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/mattn/go-isatty"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"

	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

type drainOpts struct {
	deadline time.Duration
	wait     bool
	dryRun   bool
}

func newDrainCmd(g *globalOpts) *cobra.Command {
	var o drainOpts
	cmd := &cobra.Command{
		Use:   "drain",
		Short: "Cordon the node, hand its sessions on, let its calls finish",
		Long: `Drain cordons the node and marks it draining (it stays so across restarts
until uncordon): routers send it no new work and hand its sessions to their
next owners, and the calls running or queued on it finish. At the deadline
the calls still running are cancelled and reported. The node keeps draining
when spctl exits; --wait follows it until it is drained.`,
		Example: `  spctl drain --dry-run        # which sessions would move where
  spctl drain --wait --deadline 10m`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			if o.dryRun || !o.wait {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, g.timeout)
				defer cancel()
			}
			c, ctx, err := g.dialAdmin(ctx)
			if err != nil {
				return err
			}
			defer c.Close()
			st, err := c.Admin.Drain(ctx, &snakepitv1.DrainRequest{Deadline: durationpb.New(o.deadline), DryRun: o.dryRun})
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			live := false
			if f, ok := out.(*os.File); ok && g.output == "table" {
				live = isatty.IsTerminal(f.Fd())
			}
			for {
				p, err := st.Recv()
				if errors.Is(err, io.EOF) {
					return errors.New("the node ended the drain report early (restarted?); spctl drain --wait again follows it")
				}
				if err != nil {
					return err
				}
				if g.output == "json" {
					if err := printJSON(cmd, p); err != nil {
						return err
					}
				} else if o.dryRun {
					return printMoves(cmd, p)
				} else {
					printProgress(out, p, live)
				}
				if o.dryRun || p.GetDrained() {
					return nil
				}
				if !o.wait {
					fmt.Fprintln(out, "draining; spctl drain --wait follows it, spctl uncordon stops it")
					return nil
				}
			}
		},
	}
	cmd.Flags().DurationVar(&o.deadline, "deadline", 0, "cancel the calls still running after this long (default: the node's, 5m)")
	cmd.Flags().BoolVar(&o.wait, "wait", false, "follow the drain until the node is drained")
	cmd.Flags().BoolVar(&o.dryRun, "dry-run", false, "print which sessions would move to which nodes; change nothing")
	return cmd
}

// printProgress shows one report: redrawn in place on a terminal, one line
// each otherwise.
func printProgress(w io.Writer, p *snakepitv1.DrainProgress, live bool) {
	line := fmt.Sprintf("in flight %d  queued %d  sessions %d  deadline in %s", p.GetInFlight(), p.GetQueued(), p.GetSessions(),
		p.GetRemaining().AsDuration().Round(time.Second))
	if p.GetDrained() {
		line = fmt.Sprintf("drained (%d calls cancelled at the deadline)", p.GetCancelled())
	}
	if live {
		fmt.Fprintf(w, "\r\033[K%s", line)
		if p.GetDrained() {
			fmt.Fprintln(w)
		}
		return
	}
	fmt.Fprintln(w, line)
}

func printMoves(cmd *cobra.Command, p *snakepitv1.DrainProgress) error {
	out := cmd.OutOrStdout()
	fmt.Fprintf(out, "dry run: %d calls in flight, %d queued, %d sessions would move\n\n", p.GetInFlight(), p.GetQueued(), len(p.GetMoves()))
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SESSION\tPOOL\tNEXT OWNER")
	for _, m := range p.GetMoves() {
		next := m.GetNextNode()
		if next == "" {
			next = "(none: no other node serves the pool)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", m.GetSessionId(), m.GetPool(), next)
	}
	return tw.Flush()
}
