package policy_test

import (
	"testing"
	"time"

	"github.com/snakepit/snakepit/pkg/agent/call"
	"github.com/snakepit/snakepit/pkg/agent/policy"
)

func TestAffinityPolicies(t *testing.T) {
	for _, tc := range []struct {
		name      string
		p         policy.AffinityPolicy
		mode      call.Affinity
		ownerOnly bool
		down      policy.OwnerAction // OwnerDown(0, 30s): the owner just refused
		busy      policy.BusyAction
		gone      policy.GoneAction
	}{
		{policy.Hint, policy.HintPolicy, call.AffinityHint, false, policy.TakeOver, policy.RunElsewhere, policy.Rebind},
		{policy.StrictQueue, policy.StrictQueuePolicy, call.AffinityStrictQueue, true, policy.WaitForOwner, policy.WaitForWorker, policy.Lose},
		{policy.StrictFailFast, policy.StrictFailFastPolicy, call.AffinityStrictFailFast, true, policy.FailOwner, policy.RefuseBusy, policy.Lose},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.p.Mode(); got != tc.mode {
				t.Errorf("Mode() = %v, want %v", got, tc.mode)
			}
			if got := tc.p.Mode().String(); got != tc.name {
				t.Errorf("Mode().String() = %q, want the policy's name %q", got, tc.name)
			}
			if got := tc.p.OwnerOnly(); got != tc.ownerOnly {
				t.Errorf("OwnerOnly() = %v, want %v", got, tc.ownerOnly)
			}
			if got := tc.p.OwnerDown(0, 30*time.Second); got != tc.down {
				t.Errorf("OwnerDown(0, 30s) = %d, want %d", got, tc.down)
			}
			if got := tc.p.WorkerBusy(); got != tc.busy {
				t.Errorf("WorkerBusy() = %d, want %d", got, tc.busy)
			}
			if got := tc.p.WorkerGone(); got != tc.gone {
				t.Errorf("WorkerGone() = %d, want %d", got, tc.gone)
			}
			// Build gives the same policy by name.
			c := defaults()
			c.Affinity.Name = tc.name
			if got := mustBuild(t, c).Affinity; got != tc.p {
				t.Errorf("Build(affinity %s).Affinity = %v, want the shipped policy", tc.name, got.Mode())
			}
		})
	}
}

func TestOwnerDown(t *testing.T) {
	const lease = 30 * time.Second
	for _, tc := range []struct {
		name           string
		p              policy.AffinityPolicy
		downFor, lease time.Duration
		want           policy.OwnerAction
	}{
		{"strict_queue just refused", policy.StrictQueuePolicy, 0, lease, policy.WaitForOwner},
		{"strict_queue within lease", policy.StrictQueuePolicy, lease - time.Nanosecond, lease, policy.WaitForOwner},
		{"strict_queue at lease", policy.StrictQueuePolicy, lease, lease, policy.TakeOver},
		{"strict_queue past lease", policy.StrictQueuePolicy, 2 * lease, lease, policy.TakeOver},
		{"strict_queue zero lease, just refused", policy.StrictQueuePolicy, 0, 0, policy.WaitForOwner},
		{"strict_queue zero lease, down", policy.StrictQueuePolicy, time.Nanosecond, 0, policy.TakeOver},
		{"strict_fail_fast just refused", policy.StrictFailFastPolicy, 0, lease, policy.FailOwner},
		{"strict_fail_fast past lease", policy.StrictFailFastPolicy, 2 * lease, lease, policy.FailOwner},
		{"hint just refused", policy.HintPolicy, 0, lease, policy.TakeOver},
		{"hint past lease", policy.HintPolicy, 2 * lease, lease, policy.TakeOver},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.p.OwnerDown(tc.downFor, tc.lease); got != tc.want {
				t.Errorf("OwnerDown(%v, %v) = %d, want %d", tc.downFor, tc.lease, got, tc.want)
			}
		})
	}
}

func TestAffinityDoesNotAllocate(t *testing.T) {
	s := mustBuild(t, defaults())
	for _, p := range []policy.AffinityPolicy{policy.HintPolicy, policy.StrictQueuePolicy, policy.StrictFailFastPolicy} {
		var (
			mode call.Affinity
			only bool
			own  policy.OwnerAction
			busy policy.BusyAction
			gone policy.GoneAction
			got  policy.AffinityPolicy
		)
		for name, f := range map[string]func(){
			"Mode":        func() { mode = p.Mode() },
			"OwnerOnly":   func() { only = p.OwnerOnly() },
			"OwnerDown":   func() { own = p.OwnerDown(time.Second, time.Minute) },
			"WorkerBusy":  func() { busy = p.WorkerBusy() },
			"WorkerGone":  func() { gone = p.WorkerGone() },
			"AffinityFor": func() { got = s.AffinityFor(p.Mode()) },
		} {
			if n := testing.AllocsPerRun(100, f); n != 0 {
				t.Errorf("%v: %s allocates %v times per call, want 0", p.Mode(), name, n)
			}
		}
		_, _, _, _, _, _ = mode, only, own, busy, gone, got
	}
}
