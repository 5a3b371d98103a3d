package main

import (
	"context"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

func newToolsCmd(g *globalOpts) *cobra.Command {
	var pool string
	cmd := &cobra.Command{
		Use:   "tools",
		Short: "List the tools the node serves",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, _, err := g.dial()
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
			defer cancel()
			resp, err := c.Snakepit.ListTools(ctx, &snakepitv1.ListToolsRequest{Pool: pool})
			if err != nil {
				return err
			}
			if g.output == "json" {
				return printJSON(cmd, resp)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "POOL\tTOOL\tPARAMETERS\tDOC")
			for _, t := range resp.GetTools() {
				var params []string
				for _, p := range t.GetParameters() {
					s := p.GetName()
					if p.GetType() != "" {
						s += ": " + p.GetType()
					}
					if !p.GetRequired() {
						s += " = " + p.GetDefaultJson()
					}
					params = append(params, s)
				}
				name := t.GetName()
				if t.GetStreaming() {
					name += " (stream)"
				}
				doc, _, _ := strings.Cut(t.GetDoc(), "\n")
				fmt.Fprintf(tw, "%s\t%s\t(%s)\t%s\n", t.GetPool(), name, strings.Join(params, ", "), doc)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&pool, "pool", "", "list only this pool's tools")
	return cmd
}

func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usageError{fmt.Errorf("%s takes no arguments (got %q)", cmd.Name(), args)}
	}
	return nil
}
