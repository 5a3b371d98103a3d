package worker

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// ProcStat is what the kernel says of one process (from /proc/PID/stat).
type ProcStat struct {
	PID  int
	PPID int
	PGID int
	// State is the one-letter state; "Z" is a zombie (dead, not reaped).
	State string
	// StartTicks is the start time in clock ticks since boot: with the
	// boot id, it tells a process from a later one that reused its pid.
	StartTicks uint64
	// RSSPages is the resident set size in pages.
	RSSPages uint64
}

// ReadProcStat reads /proc/PID/stat.
func ReadProcStat(pid int) (ProcStat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return ProcStat{}, err
	}
	return parseProcStat(pid, b)
}

func parseProcStat(pid int, b []byte) (ProcStat, error) {
	// The command name (field 2) is in parentheses and may hold spaces or
	// parentheses itself: the fields that follow start after the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 > len(b) {
		return ProcStat{}, fmt.Errorf("malformed /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+2:]))
	// f[0] is field 3 (state); field N is f[N-3].
	if len(f) < 22 {
		return ProcStat{}, fmt.Errorf("short /proc/%d/stat", pid)
	}
	st := ProcStat{PID: pid, State: f[0]}
	st.PPID, _ = strconv.Atoi(f[1])
	st.PGID, _ = strconv.Atoi(f[2])
	st.StartTicks, _ = strconv.ParseUint(f[19], 10, 64)
	st.RSSPages, _ = strconv.ParseUint(f[21], 10, 64)
	return st, nil
}

// Alive reports whether a process exists and is not a zombie.
func (s ProcStat) Alive() bool { return s.State != "Z" && s.State != "X" }

// ListProcs reads the stat of every process on the host. Processes that
// vanish while it reads are skipped.
func ListProcs() ([]ProcStat, error) {
	d, err := os.Open("/proc")
	if err != nil {
		return nil, err
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return nil, err
	}
	out := make([]ProcStat, 0, len(names))
	for _, n := range names {
		pid, err := strconv.Atoi(n)
		if err != nil {
			continue
		}
		st, err := ReadProcStat(pid)
		if err != nil {
			continue
		}
		out = append(out, st)
	}
	return out, nil
}

var pageSize = uint64(os.Getpagesize())

// GroupRSS sums the resident memory, in bytes, of the live processes of each
// given process group (a worker and everything it forked), from one scan of
// /proc.
func GroupRSS(pgids []int) (map[int]uint64, error) {
	want := make(map[int]bool, len(pgids))
	for _, g := range pgids {
		want[g] = true
	}
	procs, err := ListProcs()
	if err != nil {
		return nil, err
	}
	out := make(map[int]uint64, len(pgids))
	for _, p := range procs {
		if want[p.PGID] && p.Alive() {
			out[p.PGID] += p.RSSPages * pageSize
		}
	}
	return out, nil
}

// BootID identifies the current boot of the host; process start times are
// only comparable within one boot.
func BootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// HasEnv reports whether process pid's initial environment holds exactly
// the entry kv ("KEY=value").
func HasEnv(pid int, kv string) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
	if err != nil {
		return false
	}
	for _, e := range bytes.Split(b, []byte{0}) {
		if string(e) == kv {
			return true
		}
	}
	return false
}

// killGroup sends sig to a process group, ignoring a group already gone.
func killGroup(pgid int, sig syscall.Signal) error {
	if pgid <= 1 {
		return fmt.Errorf("refusing to signal process group %d", pgid)
	}
	err := syscall.Kill(-pgid, sig)
	if errors.Is(err, syscall.ESRCH) {
		return nil
	}
	return err
}

// KillGroup sends SIGKILL to a process group.
func KillGroup(pgid int) error { return killGroup(pgid, syscall.SIGKILL) }
