package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"reflect"
	"strings"
	"syscall"
	"time"

	sddaemon "github.com/coreos/go-systemd/v22/daemon"
	"github.com/mattn/go-isatty"
	"github.com/rs/zerolog"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"

	"github.com/snakepit/snakepit/pkg/agent"
)

// envPrefix prefixes the environment variables that configure the daemon.
const envPrefix = "SNAKEPIT"

// run is the whole program; it returns the exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	cmd := newRootCmd(ctx, stdout, stderr)
	cmd.SetArgs(args)
	if err := cmd.Execute(); err != nil {
		fmt.Fprintf(stderr, "snakepitd: %v\n", err)
		return 1
	}
	return 0
}

type options struct {
	configFile string
	logLevel   string
	logFormat  string
	listenFile string
	pprofAddr  string
}

func newRootCmd(ctx context.Context, stdout, stderr io.Writer) *cobra.Command {
	var opts options
	d := agent.DefaultConfig()
	cmd := &cobra.Command{
		Use:   "snakepitd",
		Short: "Run a snakepit node: pools of Python workers behind a gRPC endpoint",
		Long: `snakepitd runs pools of Python worker processes and serves them over gRPC.

With no configuration it runs standalone with one pool of the bundled example
adapter. Configuration comes from, in rising order of precedence: built-in
defaults, the config file (--config or $SNAKEPIT_CONFIG), SNAKEPIT_*
environment variables (SNAKEPIT_LISTEN, SNAKEPIT_NODE_ID, ...) and flags.
See configs/snakepitd.yaml for every key.`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadConfig(cmd.Flags(), opts.configFile)
			if err != nil {
				return err
			}
			log, err := newLogger(stderr, opts.logLevel, opts.logFormat)
			if err != nil {
				return err
			}
			return serve(ctx, cfg, log, opts)
		},
	}
	cmd.SetOut(stdout)
	cmd.SetErr(stderr)
	f := cmd.Flags()
	f.StringVarP(&opts.configFile, "config", "c", "", "config file (YAML, TOML or JSON); also $SNAKEPIT_CONFIG")
	f.String("listen", d.Listen, "gRPC address to serve on (host:port)")
	f.String("metrics-listen", d.MetricsListen, `Prometheus /metrics address (host:port), or "off"`)
	f.String("node-id", "", "node id, unique in the cluster (default: the host name)")
	f.String("state-dir", "", "state directory (default: $STATE_DIRECTORY, else ~/.local/state/snakepitd)")
	f.StringVar(&opts.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	f.StringVar(&opts.logFormat, "log-format", "auto", "log format: json, console, or auto (console on a terminal)")
	f.StringVar(&opts.pprofAddr, "pprof-addr", "", "serve Go's pprof profiles over HTTP on this address (e.g. 127.0.0.1:6060); off when empty")
	f.StringVar(&opts.listenFile, "listen-file", "", "write the bound gRPC address to this file once listening (for scripts and tests using port 0)")
	cmd.AddCommand(&cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Args:  cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) {
			fmt.Fprintln(cmd.OutOrStdout(), agent.Version)
		},
	})
	return cmd
}

// flagKeys maps flags to config keys.
var flagKeys = map[string]string{
	"listen":         "listen",
	"metrics-listen": "metrics_listen",
	"node-id":        "node_id",
	"state-dir":      "state_dir",
}

// loadConfig builds the config: defaults < file < environment < flags.
// Unknown keys in the file are an error that names them.
func loadConfig(flags *pflag.FlagSet, file string) (agent.Config, error) {
	v := viper.New()
	v.SetEnvPrefix(envPrefix)
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_"))
	v.AutomaticEnv()
	d := agent.DefaultConfig()
	setDefaults(v, "", reflect.ValueOf(d))
	for flag, key := range flagKeys {
		if err := v.BindPFlag(key, flags.Lookup(flag)); err != nil {
			return agent.Config{}, err
		}
	}
	if file == "" {
		file = os.Getenv(envPrefix + "_CONFIG")
	}
	if file != "" {
		v.SetConfigFile(file)
		if err := v.ReadInConfig(); err != nil {
			return agent.Config{}, fmt.Errorf("read config file %s: %w", file, err)
		}
	}
	cfg := d
	if err := v.UnmarshalExact(&cfg); err != nil {
		where := "configuration"
		if file != "" {
			where = "config file " + file
		}
		return agent.Config{}, fmt.Errorf("%s: %w (see configs/snakepitd.yaml for the keys)", where, err)
	}
	if file != "" {
		if err := restoreKeyCase(file, &cfg); err != nil {
			return agent.Config{}, err
		}
	}
	if err := cfg.Validate(); err != nil {
		return agent.Config{}, fmt.Errorf("invalid configuration:\n%w", err)
	}
	return cfg, nil
}

func newLogger(w io.Writer, level, format string) (zerolog.Logger, error) {
	lvl, err := zerolog.ParseLevel(level)
	if err != nil || level == "" {
		return zerolog.Logger{}, fmt.Errorf("--log-level must be debug, info, warn or error (got %q)", level)
	}
	switch format {
	case "auto":
		if f, ok := w.(*os.File); ok && isatty.IsTerminal(f.Fd()) {
			w = zerolog.ConsoleWriter{Out: w, TimeFormat: "15:04:05.000"}
		}
	case "console":
		w = zerolog.ConsoleWriter{Out: w, TimeFormat: "15:04:05.000", NoColor: true}
	case "json":
	default:
		return zerolog.Logger{}, fmt.Errorf("--log-format must be json, console or auto (got %q)", format)
	}
	return zerolog.New(w).Level(lvl).With().Timestamp().Logger(), nil
}

// serve runs the node until SIGTERM or SIGINT. A second signal exits at
// once with status 1 (workers die with the daemon: parent-death signal).
func serve(ctx context.Context, cfg agent.Config, log zerolog.Logger, opts options) error {
	signal.Ignore(syscall.SIGPIPE)
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer signal.Stop(sigs)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	forced := make(chan os.Signal, 1)
	finished := make(chan struct{})
	defer close(finished)
	go func() {
		stops := 0
		for {
			select {
			case s := <-sigs:
				if s == syscall.SIGHUP {
					log.Warn().Msg("SIGHUP: reloading the configuration is not supported; restart to apply changes")
					continue
				}
				stops++
				if stops == 1 {
					log.Info().Str("signal", s.String()).Msg("shutting down")
					cancel()
					continue
				}
				forced <- s
				return
			case <-finished:
				return
			}
		}
	}()
	if opts.pprofAddr != "" {
		stopPprof, err := servePprof(opts.pprofAddr, log)
		if err != nil {
			return err
		}
		defer stopPprof()
	}
	done := make(chan error, 1)
	go func() {
		done <- agent.Serve(ctx, cfg, log, agent.Hooks{
			Ready: func() {
				if _, err := sddaemon.SdNotify(false, sddaemon.SdNotifyReady); err != nil {
					log.Warn().Err(err).Msg("telling systemd we are ready")
				}
			},
			Stopping: func() {
				_, _ = sddaemon.SdNotify(false, sddaemon.SdNotifyStopping)
			},
			Listening: func(addr net.Addr) {
				if opts.listenFile != "" {
					if err := os.WriteFile(opts.listenFile, []byte(addr.String()+"\n"), 0o644); err != nil {
						log.Error().Err(err).Str("path", opts.listenFile).Msg("write listen file")
					}
				}
			},
		})
	}()
	select {
	case err := <-done:
		return err
	case s := <-forced:
		return errors.New("second " + s.String() + ": exiting without a clean stop")
	}
}

// servePprof serves net/http/pprof's handlers on addr (never on the gRPC
// port) and returns a function that stops it.
func servePprof(addr string, log zerolog.Logger) (func(), error) {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--pprof-addr %s: %w", addr, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(lis) }()
	log.Info().Str("addr", lis.Addr().String()).Msg("serving pprof")
	return func() { _ = srv.Close() }, nil
}
