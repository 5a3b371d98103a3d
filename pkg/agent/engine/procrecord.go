package engine

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/rs/zerolog"

	"github.com/snakepit/snakepit/pkg/worker"
)

// procRecord keeps, in the state directory, the list of worker processes
// this run of the daemon has alive, so that the next run can find and kill
// what a crash of the daemon left behind (DESIGN.md decision 9).
//
// The file is rewritten (atomically, by rename) whenever a worker starts or
// exits. It is not synced to disk: it must survive a crash of the daemon,
// not of the host, and a reboot ends the processes anyway.
type procRecord struct {
	path  string
	log   zerolog.Logger
	mu    sync.Mutex
	run   recordFile
	procs map[int]recordedProc
}

type recordFile struct {
	// RunID is the random id of the daemon run; its workers carry it in
	// their environment as SNAKEPIT_RUN_ID.
	RunID string `json:"run_id"`
	// BootID is the host boot the start times refer to.
	BootID string         `json:"boot_id"`
	Procs  []recordedProc `json:"procs"`
}

type recordedProc struct {
	Pool       string `json:"pool"`
	WorkerID   uint64 `json:"worker_id"`
	Generation uint64 `json:"generation"`
	// PID is also the process group id: every worker leads its own group.
	PID        int    `json:"pid"`
	StartTicks uint64 `json:"start_ticks"`
}

func newProcRecord(path, runID string, log zerolog.Logger) *procRecord {
	return &procRecord{
		path:  path,
		log:   log,
		run:   recordFile{RunID: runID, BootID: worker.BootID()},
		procs: map[int]recordedProc{},
	}
}

func (r *procRecord) add(w *worker.Worker) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.procs[w.PID()] = recordedProc{Pool: w.Pool(), WorkerID: uint64(w.ID()), Generation: uint64(w.Generation()), PID: w.PID(), StartTicks: w.StartTicks()}
	r.writeLocked()
}

func (r *procRecord) remove(w *worker.Worker) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.procs, w.PID())
	r.writeLocked()
}

func (r *procRecord) writeLocked() {
	f := r.run
	f.Procs = make([]recordedProc, 0, len(r.procs))
	for _, p := range r.procs {
		f.Procs = append(f.Procs, p)
	}
	b, _ := json.Marshal(f)
	if err := writeFile(r.path, b, false); err != nil {
		r.log.Error().Err(err).Str("path", r.path).Msg("writing the worker record")
	}
}

// sweep kills what a previous run of this daemon (same state directory)
// left behind: for each worker it recorded, every live process of that
// worker's process group (grandchildren included) that started no earlier
// than the worker did, on the same boot, and carries the previous run's id
// in its environment. A pid reused by an unrelated process fails these
// checks and is never touched; so are the processes of other daemons, which
// record their workers in their own state directories.
func sweep(path string, log zerolog.Logger) (int, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read worker record: %w", err)
	}
	var prev recordFile
	if err := json.Unmarshal(b, &prev); err != nil {
		log.Warn().Err(err).Str("path", path).Msg("worker record unreadable; not sweeping")
		return 0, nil
	}
	if prev.BootID == "" || prev.BootID != worker.BootID() || prev.RunID == "" || len(prev.Procs) == 0 {
		return 0, nil
	}
	groups := map[int]uint64{}
	for _, p := range prev.Procs {
		groups[p.PID] = p.StartTicks
	}
	procs, err := worker.ListProcs()
	if err != nil {
		return 0, fmt.Errorf("list processes: %w", err)
	}
	mark := "SNAKEPIT_RUN_ID=" + prev.RunID
	killed := 0
	for _, p := range procs {
		leaderStart, ok := groups[p.PGID]
		if !ok || !p.Alive() || p.StartTicks < leaderStart || p.PID == os.Getpid() {
			continue
		}
		if !worker.HasEnv(p.PID, mark) {
			continue
		}
		if err := killPID(p.PID); err != nil {
			log.Warn().Err(err).Int("pid", p.PID).Msg("killing a leftover worker process")
			continue
		}
		log.Warn().Int("pid", p.PID).Int("pgid", p.PGID).Str("run_id", prev.RunID).Msg("killed a process left by the previous run")
		killed++
	}
	return killed, nil
}
