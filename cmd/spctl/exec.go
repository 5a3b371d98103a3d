package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"

	"github.com/spf13/cobra"

	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

type execOpts struct {
	args       string
	pool       string
	session    string
	requestID  string
	idempotent bool
}

func newExecCmd(g *globalOpts) *cobra.Command {
	var o execOpts
	cmd := &cobra.Command{
		Use:   "exec TOOL [--args JSON]",
		Short: "Run a tool and print its result",
		Long: `Run a tool on the node and print its result as JSON on stdout.
Where it ran (node, pool, worker, generation, timings) goes to stderr, so the
output can be piped; -o json prints one JSON object with both.`,
		Example: `  spctl exec add --args '{"a": 1, "b": 2}'
  spctl exec echo --args '{"hello": "world"}' -o json`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usageError{fmt.Errorf("exec takes exactly one TOOL (got %d arguments); list tools with `spctl tools`", len(args))}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if o.args != "" && !json.Valid([]byte(o.args)) {
				return usageError{fmt.Errorf("--args is not valid JSON: %s", o.args)}
			}
			c, _, err := g.dial()
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
			defer cancel()
			resp, err := c.Snakepit.Execute(ctx, &snakepitv1.ExecuteRequest{
				Tool: args[0], Pool: o.pool, Args: []byte(o.args), SessionId: o.session,
				RequestId: o.requestID, Idempotent: o.idempotent,
			})
			if err != nil {
				return err
			}
			return printExec(cmd, g, resp)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.args, "args", "", "arguments as a JSON object")
	f.StringVar(&o.pool, "pool", "", "pool (default: the node's default pool)")
	f.StringVar(&o.session, "session", "", "session id")
	f.StringVar(&o.requestID, "request-id", "", "request id (default: the node assigns one)")
	f.BoolVar(&o.idempotent, "idempotent", false, "the call may safely run more than once")
	return cmd
}

func printExec(cmd *cobra.Command, g *globalOpts, resp *snakepitv1.ExecuteResponse) error {
	out := cmd.OutOrStdout()
	ran := resp.GetRanOn()
	if g.output == "json" {
		result := json.RawMessage(resp.GetResult())
		if len(result) == 0 {
			result = json.RawMessage("null")
		}
		b, err := json.MarshalIndent(map[string]any{
			"result":            result,
			"request_id":        resp.GetRequestId(),
			"node_id":           ran.GetNodeId(),
			"pool":              ran.GetPool(),
			"worker_id":         ran.GetWorkerId(),
			"worker_generation": ran.GetWorkerGeneration(),
			"queued":            resp.GetQueued().AsDuration().String(),
			"ran":               resp.GetRan().AsDuration().String(),
		}, "", "  ")
		if err != nil {
			return err
		}
		_, err = fmt.Fprintln(out, string(b))
		return err
	}
	var pretty bytes.Buffer
	if err := json.Indent(&pretty, resp.GetResult(), "", "  "); err != nil {
		pretty.Reset()
		pretty.Write(resp.GetResult())
	}
	fmt.Fprintln(out, pretty.String())
	fmt.Fprintf(cmd.ErrOrStderr(), "ran on node %s, pool %s, worker %d generation %d (queued %s, ran %s, request %s)\n",
		ran.GetNodeId(), ran.GetPool(), ran.GetWorkerId(), ran.GetWorkerGeneration(),
		resp.GetQueued().AsDuration(), resp.GetRan().AsDuration(), resp.GetRequestId())
	return nil
}
