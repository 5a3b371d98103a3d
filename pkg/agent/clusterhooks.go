package agent

import "github.com/snakepit/snakepit/pkg/router"

// nextOwner names the node that would own a session of a pool if this node
// left the ranking: rendezvous ranking without this node. "" when routing
// has no table yet or no other node serves the pool.
func (f *forwarder) nextOwner(pool, sessionID string) string {
	st := f.state.Load()
	if st == nil || st.table == nil {
		return ""
	}
	c, err := st.table.Owner(router.Request{SessionID: sessionID, Pool: pool, Exclude: []router.NodeID{router.NodeID(f.n.cfg.NodeID)}})
	if err != nil {
		return ""
	}
	return string(c.ID)
}

// peerAddrs lists the cluster's nodes as the last snapshot has them: node
// id -> gRPC address.
func (f *forwarder) peerAddrs() map[string]string {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[string]string{}
	if f.snap == nil {
		return out
	}
	for _, p := range f.snap.Peers() {
		out[string(p.ID)] = p.Addr
	}
	return out
}
