package engine

import (
	"time"

	"github.com/snakepit/snakepit/pkg/agent/policy"
)

// PoolConfig configures one pool of identical workers.
type PoolConfig struct {
	// Name identifies the pool in requests.
	Name string `mapstructure:"name"`
	// Adapter is the user's Python code: "module", "module:Class",
	// "path/to/file.py" or "path/to/file.py:Class".
	Adapter string `mapstructure:"adapter"`
	// Python is the interpreter. Empty means the virtualenv's bin/python
	// when Virtualenv is set, else DefaultPython.
	Python string `mapstructure:"python"`
	// Virtualenv is a virtual environment the workers run in: its bin/ goes
	// first on PATH and VIRTUAL_ENV is set.
	Virtualenv string `mapstructure:"virtualenv"`
	// PythonPath lists extra directories to import the adapter from.
	PythonPath []string `mapstructure:"python_path"`
	// Dir is the workers' working directory; empty means the daemon's.
	Dir string `mapstructure:"dir"`
	// Env adds environment variables to the workers. The thread counts of
	// math libraries (OMP_NUM_THREADS and the like) default to Capacity;
	// set them here to override.
	Env map[string]string `mapstructure:"env"`
	// Size is the number of workers.
	Size int `mapstructure:"size"`
	// MinReady is how many workers must be ready before the node reports
	// ready; 0 means Size.
	MinReady int `mapstructure:"min_ready"`
	// Capacity is how many calls one worker runs at once (threads).
	Capacity int `mapstructure:"capacity"`
	// QueueDepth is how many calls may wait for a free worker; a call past
	// it is refused at once with RESOURCE_EXHAUSTED.
	QueueDepth int `mapstructure:"queue_depth"`
	// QueueMaxWait is the longest a call waits for a worker before it is
	// refused with RESOURCE_EXHAUSTED (not executed).
	QueueMaxWait time.Duration `mapstructure:"queue_max_wait"`
	// CallTimeout is the deadline of calls that carry none.
	CallTimeout time.Duration `mapstructure:"call_timeout"`
	// StartTimeout bounds one worker's start.
	StartTimeout time.Duration `mapstructure:"start_timeout"`
	// StopGrace is the time a worker gets at each step of stopping.
	StopGrace time.Duration `mapstructure:"stop_grace"`
	// MaxCalls recycles a worker after it served this many calls; 0 never.
	MaxCalls int `mapstructure:"max_calls"`
	// MaxAge recycles a worker this long after it started; 0 never.
	MaxAge time.Duration `mapstructure:"max_age"`
	// MaxMemoryMB recycles a worker whose process tree's resident memory
	// passes this many MiB; 0 never.
	MaxMemoryMB int `mapstructure:"max_memory_mb"`
	// RecycleDrainTimeout bounds how long a worker being recycled may finish
	// its calls (its replacement already serves) before it is stopped.
	RecycleDrainTimeout time.Duration `mapstructure:"recycle_drain_timeout"`
	// HeartbeatInterval is how often each worker is pinged.
	HeartbeatInterval time.Duration `mapstructure:"heartbeat_interval"`
	// HeartbeatTimeout is how long a worker may leave pings unanswered
	// before it is killed as hung and replaced.
	HeartbeatTimeout time.Duration `mapstructure:"heartbeat_timeout"`
	// CancelGrace is how long a cancelled call may keep running before its
	// worker is recycled.
	CancelGrace time.Duration `mapstructure:"cancel_grace"`
	// RestartBackoffMin and RestartBackoffMax bound the exponential
	// back-off between restarts of a crashing worker.
	RestartBackoffMin time.Duration `mapstructure:"restart_backoff_min"`
	RestartBackoffMax time.Duration `mapstructure:"restart_backoff_max"`
	// RestartBudget is how many crashes of one worker within RestartWindow
	// are tolerated; past it the worker is tainted (not restarted) for
	// TaintCooldown and the pool is degraded.
	RestartBudget int           `mapstructure:"restart_budget"`
	RestartWindow time.Duration `mapstructure:"restart_window"`
	TaintCooldown time.Duration `mapstructure:"taint_cooldown"`
	// SessionIdleTimeout ends a session that had no call for this long.
	SessionIdleTimeout time.Duration `mapstructure:"session_idle_timeout"`
	// MaxSessionsPerWorker bounds the sessions bound to one worker.
	MaxSessionsPerWorker int `mapstructure:"max_sessions_per_worker"`
	// StreamWindow is how many chunks of a stream may be in flight between
	// the generator and the client; a slow client makes the generator wait.
	StreamWindow int `mapstructure:"stream_window"`
	// GPUs pins the workers to GPUs (see GPUConfig); none by default.
	GPUs GPUConfig `mapstructure:"gpus"`
	// Policies select the pool's routing, worker, queue and affinity
	// policies by name (docs/policies.md).
	Policies policy.Config `mapstructure:"policies"`
}
