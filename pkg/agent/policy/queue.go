package policy

// boundedQueue (the default) queues a call while fewer than queue_depth
// wait, and refuses it (QUEUE_FULL, not executed) past that.
type boundedQueue struct{}

func newBoundedQueue(env Env, opts Options) (QueuePolicy, error) {
	return boundedQueue{}, env.Options(opts).Err()
}

func (boundedQueue) Admit(s QueueState) QueueAction {
	if s.Queued < s.Depth {
		return Wait
	}
	return Refuse
}

// reject never queues: a call that finds no free worker is refused at once
// (QUEUE_FULL, not executed), and a router tries the next node.
type reject struct{}

func newReject(env Env, opts Options) (QueuePolicy, error) {
	return reject{}, env.Options(opts).Err()
}

func (reject) Admit(QueueState) QueueAction { return Refuse }

// spillover queues like queue, except that a call the router may move on
// (sessionless, or a hint session with another candidate) is refused as
// not executed once threshold calls wait, and runs on the next node
// instead of waiting here.
type spillover struct{ threshold int }

func newSpillover(env Env, opts Options) (QueuePolicy, error) {
	d := env.Options(opts)
	t := d.Int("threshold", 0)
	if t < 0 {
		d.Fail("threshold", "must not be negative (got %d)", t)
	}
	return spillover{threshold: t}, d.Err()
}

func (p spillover) Admit(s QueueState) QueueAction {
	if s.Movable && s.Queued >= p.threshold {
		return Spill
	}
	if s.Queued < s.Depth {
		return Wait
	}
	return Refuse
}
