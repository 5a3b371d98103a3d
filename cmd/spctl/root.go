package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/snakepit/snakepit/pkg/client"
)

// globalOpts are the flags every command takes.
type globalOpts struct {
	addr        string
	output      string
	timeout     time.Duration
	adminSocket string
	tokenFile   string
	tlsCA       string
	tlsCert     string
	tlsKey      string
}

// usageError marks errors in how spctl was called (exit status 2).
type usageError struct{ error }

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmd := newRootCmd(ctx)
	cmd.SetArgs(args)
	cmd.SetOut(stdout)
	cmd.SetErr(stderr)
	err := cmd.Execute()
	if err == nil {
		return 0
	}
	fmt.Fprintln(stderr, "spctl: "+describe(err))
	var ue usageError
	if errors.As(err, &ue) {
		return 2
	}
	return 1
}

func newRootCmd(ctx context.Context) *cobra.Command {
	g := &globalOpts{}
	cmd := &cobra.Command{
		Use:           "spctl",
		Short:         "Operate snakepit nodes",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			switch g.output {
			case "table", "json":
			default:
				return usageError{fmt.Errorf("-o must be table or json (got %q)", g.output)}
			}
			return nil
		},
	}
	cmd.SetContext(ctx)
	pf := cmd.PersistentFlags()
	pf.StringVar(&g.addr, "addr", "", fmt.Sprintf("node address host:port (default $%s, else %s)", client.EnvAddress, client.DefaultAddress))
	pf.StringVarP(&g.output, "output", "o", "table", "output format: table or json")
	pf.DurationVar(&g.timeout, "timeout", 30*time.Second, "deadline of each call to the node")
	pf.StringVar(&g.adminSocket, "admin-socket", "", fmt.Sprintf("admin socket for cordon, uncordon, resize, workers (default $%s, else %s, else the make-run node's)", client.EnvAdminSocket, client.SystemdAdminSocket))
	pf.StringVar(&g.tlsCA, "tls-ca", "", "talk TLS to the node, trusting this CA (PEM)")
	pf.StringVar(&g.tlsCert, "tls-cert", "", "client certificate (PEM) for nodes that require one, or for admin_identities")
	pf.StringVar(&g.tlsKey, "tls-key", "", "key of --tls-cert (PEM)")
	pf.StringVar(&g.tokenFile, "token-file", "", fmt.Sprintf("bearer token for admin verbs over TCP with --addr (default $%s)", client.EnvTokenFile))
	cmd.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	cmd.AddCommand(newExecCmd(g), newToolsCmd(g), newStatusCmd(g), newSessionsCmd(g),
		newCordonCmd(g, true), newCordonCmd(g, false), newResizeCmd(g), newWorkersCmd(g), newVersionCmd(g), newDrainCmd(g))
	cmd.AddCommand(newNodesCmd(g))
	return cmd
}

// dial connects to the node the flags name.
func (g *globalOpts) dial() (*client.Conn, string, error) {
	addr := client.Address(g.addr)
	var opts []grpc.DialOption
	if g.tlsCA != "" || g.tlsCert != "" || g.tlsKey != "" {
		o, err := client.TLS(g.tlsCA, g.tlsCert, g.tlsKey)
		if err != nil {
			return nil, addr, usageError{err}
		}
		opts = append(opts, o)
	}
	c, err := client.Dial(addr, opts...)
	return c, addr, err
}

// describe renders an error from a node for a person: the status code, the
// message, and the details that say what to do.
func describe(err error) string {
	st, ok := status.FromError(err)
	if !ok {
		return err.Error()
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %s", st.Code(), st.Message())
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.RetryInfo:
			fmt.Fprintf(&b, "\n  retry after %s", d.GetRetryDelay().AsDuration())
		case *errdetails.DebugInfo:
			if len(d.GetStackEntries()) > 0 {
				b.WriteString("\n  Python traceback:")
				for _, l := range d.GetStackEntries() {
					b.WriteString("\n    " + l)
				}
			}
		}
	}
	if st.Code() == codes.Unavailable && strings.Contains(st.Message(), "connection refused") {
		b.WriteString("\n  is snakepitd running there? Start one with `make run`, or point spctl at a node with --addr or $" + client.EnvAddress)
	}
	return b.String()
}
