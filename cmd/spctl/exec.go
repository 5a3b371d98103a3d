package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

type execOpts struct {
	args       string
	pool       string
	session    string
	affinity   string
	requestID  string
	idempotent bool
	stream     bool
}

var affinities = map[string]snakepitv1.Affinity{
	"hint":             snakepitv1.Affinity_AFFINITY_HINT,
	"strict-queue":     snakepitv1.Affinity_AFFINITY_STRICT_QUEUE,
	"strict-fail-fast": snakepitv1.Affinity_AFFINITY_STRICT_FAIL_FAST,
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
			aff, ok := affinities[o.affinity]
			if !ok {
				return usageError{fmt.Errorf("--affinity must be hint, strict-queue or strict-fail-fast (got %q)", o.affinity)}
			}
			c, _, err := g.dial()
			if err != nil {
				return err
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(cmd.Context(), g.timeout)
			defer cancel()
			req := &snakepitv1.ExecuteRequest{
				Tool: args[0], Pool: o.pool, Args: []byte(o.args), SessionId: o.session,
				RequestId: o.requestID, Idempotent: o.idempotent, Affinity: aff,
			}
			if o.stream {
				return execStream(ctx, cmd, g, c.Snakepit, req)
			}
			resp, err := c.Snakepit.Execute(ctx, req)
			if err != nil {
				return err
			}
			return printExec(cmd, g, resp)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.args, "args", "", "arguments as a JSON object")
	f.StringVar(&o.pool, "pool", "", "pool (default: the node's default pool)")
	f.StringVar(&o.session, "session", "", "session id: calls of one session run where its state is")
	f.StringVar(&o.affinity, "affinity", "hint", "for --session: hint, strict-queue or strict-fail-fast")
	f.BoolVar(&o.stream, "stream", false, "call a streaming tool and print each item as it arrives (one JSON line each)")
	f.StringVar(&o.requestID, "request-id", "", "request id (default: the node assigns one)")
	f.BoolVar(&o.idempotent, "idempotent", false, "the call may safely run more than once")
	return cmd
}

// execStream prints each chunk as one JSON line the moment it arrives; with
// -o json the last line is the outcome as a JSON object.
func execStream(ctx context.Context, cmd *cobra.Command, g *globalOpts, c snakepitv1.SnakepitClient, req *snakepitv1.ExecuteRequest) error {
	st, err := c.ExecuteStream(ctx, req)
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	for {
		m, err := st.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return errors.New("the stream ended without its outcome (node stopped?)")
			}
			return err
		}
		if ch := m.GetChunk(); ch != nil {
			if _, err := fmt.Fprintln(out, string(ch.GetData())); err != nil {
				return err
			}
			continue
		}
		done := m.GetDone()
		if g.output == "json" {
			return printExec(cmd, g, done)
		}
		if r := done.GetResult(); len(r) > 0 && string(r) != "null" {
			fmt.Fprintf(cmd.ErrOrStderr(), "returned %s\n", r)
		}
		printWhere(cmd, done)
		return nil
	}
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
			"session":           sessionName(resp.GetSession()),
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
	printWhere(cmd, resp)
	return nil
}

// printWhere tells, on stderr, where a call ran and what it found of its
// session.
func printWhere(cmd *cobra.Command, resp *snakepitv1.ExecuteResponse) {
	ran := resp.GetRanOn()
	session := ""
	if s := sessionName(resp.GetSession()); s != "" {
		session = ", session " + s
	}
	fmt.Fprintf(cmd.ErrOrStderr(), "ran on node %s, pool %s, worker %d generation %d (queued %s, ran %s, request %s%s)\n",
		ran.GetNodeId(), ran.GetPool(), ran.GetWorkerId(), ran.GetWorkerGeneration(),
		resp.GetQueued().AsDuration(), resp.GetRan().AsDuration(), resp.GetRequestId(), session)
}

func sessionName(o snakepitv1.SessionOutcome) string {
	switch o {
	case snakepitv1.SessionOutcome_SESSION_OUTCOME_NEW:
		return "new"
	case snakepitv1.SessionOutcome_SESSION_OUTCOME_BOUND:
		return "bound"
	case snakepitv1.SessionOutcome_SESSION_OUTCOME_UNAVAILABLE:
		return "state unavailable (ran on another worker)"
	case snakepitv1.SessionOutcome_SESSION_OUTCOME_RESET:
		return "reset (its worker was gone; state lost)"
	}
	return ""
}
