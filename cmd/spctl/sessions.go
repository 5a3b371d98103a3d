package main

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

func newSessionsCmd(g *globalOpts) *cobra.Command {
	var pool, closeID string
	cmd := &cobra.Command{
		Use:   "sessions",
		Short: "List the sessions on the node, or close one",
		Example: `  spctl sessions
  spctl sessions --close chat-42 --pool default`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, _, err := g.dial()
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
			defer cancel()
			if closeID != "" {
				resp, err := c.Snakepit.CloseSession(ctx, &snakepitv1.CloseSessionRequest{SessionId: closeID, Pool: pool})
				if err != nil {
					return err
				}
				if g.output == "json" {
					return printJSON(cmd, resp)
				}
				if !resp.GetClosed() {
					return fmt.Errorf("no session %q on this node (list them with `spctl sessions`)", closeID)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "closed session %s\n", closeID)
				return nil
			}
			resp, err := c.Snakepit.ListSessions(ctx, &snakepitv1.ListSessionsRequest{Pool: pool})
			if err != nil {
				return err
			}
			if g.output == "json" {
				return printJSON(cmd, resp)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "SESSION\tPOOL\tWORKER\tGENERATION\tAGE\tIDLE\tCALLS\tIN-FLIGHT")
			for _, s := range resp.GetSessions() {
				fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%s\t%s\t%d\t%d\n", s.GetSessionId(), s.GetPool(), s.GetWorkerId(), s.GetWorkerGeneration(),
					s.GetAge().AsDuration().Round(time.Second), s.GetIdle().AsDuration().Round(time.Millisecond), s.GetCalls(), s.GetInFlight())
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&pool, "pool", "", "only this pool (default: all; for --close, the default pool)")
	cmd.Flags().StringVar(&closeID, "close", "", "close this session now, dropping its state")
	return cmd
}
