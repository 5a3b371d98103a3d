package policy

import (
	"time"

	"github.com/snakepit/snakepit/pkg/agent/call"
)

// The shipped affinity policies, one type each.
var (
	// HintPolicy prefers the session's node and worker; when either cannot
	// take the call, the next one runs it and the result says so
	// (SessionUnavailable, or SessionNew on another node). A session whose
	// worker is gone is bound afresh (SessionReset).
	HintPolicy AffinityPolicy = hint{}
	// StrictQueuePolicy waits for the session's node and worker, within
	// the deadline; an owner node down past break_glass_lease hands the
	// session to the next-ranked node. A lost worker is an error.
	StrictQueuePolicy AffinityPolicy = strictQueue{}
	// StrictFailFastPolicy fails at once when the session's node or worker
	// cannot take the call; a lost worker is an error.
	StrictFailFastPolicy AffinityPolicy = strictFailFast{}
)

type hint struct{}

func (hint) Mode() call.Affinity                                { return call.AffinityHint }
func (hint) OwnerOnly() bool                                    { return false }
func (hint) OwnerDown(time.Duration, time.Duration) OwnerAction { return TakeOver }
func (hint) WorkerBusy() BusyAction                             { return RunElsewhere }
func (hint) WorkerGone() GoneAction                             { return Rebind }

type strictQueue struct{}

func (strictQueue) Mode() call.Affinity { return call.AffinityStrictQueue }
func (strictQueue) OwnerOnly() bool     { return true }
func (strictQueue) OwnerDown(downFor, lease time.Duration) OwnerAction {
	if downFor > 0 && downFor >= lease {
		return TakeOver
	}
	return WaitForOwner
}
func (strictQueue) WorkerBusy() BusyAction { return WaitForWorker }
func (strictQueue) WorkerGone() GoneAction { return Lose }

type strictFailFast struct{}

func (strictFailFast) Mode() call.Affinity                                { return call.AffinityStrictFailFast }
func (strictFailFast) OwnerOnly() bool                                    { return true }
func (strictFailFast) OwnerDown(time.Duration, time.Duration) OwnerAction { return FailOwner }
func (strictFailFast) WorkerBusy() BusyAction                             { return RefuseBusy }
func (strictFailFast) WorkerGone() GoneAction                             { return Lose }

// fixedAffinity registers a policy that takes no options.
func fixedAffinity(p AffinityPolicy) AffinityFactory {
	return func(env Env, opts Options) (AffinityPolicy, error) {
		return p, env.Options(opts).Err()
	}
}
