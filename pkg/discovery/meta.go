package discovery

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// MetaVersion is the version of the Meta encoding below. It changes only for
// incompatible changes; adding keys does not change it, and readers ignore
// keys they do not know. A peer whose meta_v differs from ours is left out
// of snapshots (with a logged reason), never misread.
const MetaVersion = 1

// Meta keys (encoding version 1). Values are compact strings:
//
//	meta_v      "1"
//	version     daemon version
//	proto       "min-max" peer protocol range, e.g. "1-2"
//	pools       "name:slots,…" sorted by name, e.g. "default:4,gpu:2"
//	gpus        GPU count
//	gpu_models  distinct models, comma-separated, each %-escaped
//	gpu_mem     total GPU memory in bytes
//	tools       tools digest
//	cordoned    "true" | "false"
//	draining    "true" | "false"
//	label_<k>   one key per label
const (
	metaKeyVersion     = "meta_v"
	metaKeyDaemon      = "version"
	metaKeyProto       = "proto"
	metaKeyPools       = "pools"
	metaKeyGPUs        = "gpus"
	metaKeyGPUModels   = "gpu_models"
	metaKeyGPUMem      = "gpu_mem"
	metaKeyTools       = "tools"
	metaKeyCordoned    = "cordoned"
	metaKeyDraining    = "draining"
	metaLabelKeyPrefix = "label_"
)

// encodeMeta renders n (already validated) as Consul service Meta.
func encodeMeta(n Node) map[string]string {
	m := map[string]string{
		metaKeyVersion:   strconv.Itoa(MetaVersion),
		metaKeyDaemon:    n.Version,
		metaKeyProto:     fmt.Sprintf("%d-%d", n.ProtoMin, n.ProtoMax),
		metaKeyPools:     encodePools(n.Pools),
		metaKeyGPUs:      strconv.Itoa(n.GPUs.Count),
		metaKeyGPUModels: encodeList(n.GPUs.Models),
		metaKeyGPUMem:    strconv.FormatUint(n.GPUs.MemoryBytes, 10),
		metaKeyTools:     n.ToolsDigest,
		metaKeyCordoned:  strconv.FormatBool(n.Cordoned),
		metaKeyDraining:  strconv.FormatBool(n.Draining),
	}
	for k, v := range n.Labels {
		m[metaLabelKeyPrefix+k] = v
	}
	return m
}

func encodePools(pools map[string]PoolOffer) string {
	names := slices.Sorted(maps.Keys(pools))
	parts := make([]string, len(names))
	for i, name := range names {
		parts[i] = name + ":" + strconv.Itoa(pools[name].Slots)
	}
	return strings.Join(parts, ",")
}

// listEscaper escapes what would break a comma-separated list. url.PathUnescape
// reverses it.
var listEscaper = strings.NewReplacer("%", "%25", ",", "%2C")

func encodeList(items []string) string {
	parts := make([]string, len(items))
	for i, s := range items {
		parts[i] = listEscaper.Replace(s)
	}
	return strings.Join(parts, ",")
}

// decodeNode rebuilds a Node from a Consul service instance. It tolerates
// unknown keys; anything malformed is an error naming the key.
func decodeNode(id, host string, port int, meta map[string]string) (Node, error) {
	n := Node{ID: NodeID(id)}
	if err := n.ID.Validate(); err != nil {
		return Node{}, err
	}
	if host == "" || port < 1 || port > 65535 {
		return Node{}, fmt.Errorf("address %q port %d: not dialable", host, port)
	}
	n.Addr = net.JoinHostPort(host, strconv.Itoa(port))

	v, ok := meta[metaKeyVersion]
	if !ok {
		return Node{}, errors.New("meta: no meta_v key (not a snakepit node?)")
	}
	if v != strconv.Itoa(MetaVersion) {
		return Node{}, fmt.Errorf("meta: meta_v=%q, this daemon reads %d", v, MetaVersion)
	}
	n.Version = meta[metaKeyDaemon]
	if s := meta[metaKeyProto]; s != "" {
		lo, hi, ok := strings.Cut(s, "-")
		a, err1 := strconv.Atoi(lo)
		b, err2 := strconv.Atoi(hi)
		if !ok || err1 != nil || err2 != nil || a < 0 || b < a {
			return Node{}, fmt.Errorf("meta %s=%q: want min-max", metaKeyProto, s)
		}
		n.ProtoMin, n.ProtoMax = a, b
	}
	pools, err := decodePools(meta[metaKeyPools])
	if err != nil {
		return Node{}, err
	}
	n.Pools = pools
	if n.GPUs.Count, err = atoiOrZero(meta, metaKeyGPUs); err != nil {
		return Node{}, err
	}
	if s := meta[metaKeyGPUMem]; s != "" {
		if n.GPUs.MemoryBytes, err = strconv.ParseUint(s, 10, 64); err != nil {
			return Node{}, fmt.Errorf("meta %s=%q: not a byte count", metaKeyGPUMem, s)
		}
	}
	if s := meta[metaKeyGPUModels]; s != "" {
		for _, part := range strings.Split(s, ",") {
			m, err := url.PathUnescape(part)
			if err != nil || m == "" {
				return Node{}, fmt.Errorf("meta %s=%q: bad list item %q", metaKeyGPUModels, s, part)
			}
			n.GPUs.Models = append(n.GPUs.Models, m)
		}
		sort.Strings(n.GPUs.Models)
	}
	n.ToolsDigest = meta[metaKeyTools]
	if n.Cordoned, err = boolOrFalse(meta, metaKeyCordoned); err != nil {
		return Node{}, err
	}
	if n.Draining, err = boolOrFalse(meta, metaKeyDraining); err != nil {
		return Node{}, err
	}
	for k, v := range meta {
		if lk, ok := strings.CutPrefix(k, metaLabelKeyPrefix); ok {
			if n.Labels == nil {
				n.Labels = make(map[string]string)
			}
			n.Labels[lk] = v
		}
	}
	return n, nil
}

func decodePools(s string) (map[string]PoolOffer, error) {
	if s == "" {
		return nil, nil
	}
	pools := make(map[string]PoolOffer)
	for _, part := range strings.Split(s, ",") {
		name, slots, ok := strings.Cut(part, ":")
		n, err := strconv.Atoi(slots)
		if !ok || err != nil || n < 0 || !poolNameRe.MatchString(name) {
			return nil, fmt.Errorf("meta %s=%q: bad item %q, want name:slots", metaKeyPools, s, part)
		}
		if _, dup := pools[name]; dup {
			return nil, fmt.Errorf("meta %s=%q: pool %q listed twice", metaKeyPools, s, name)
		}
		pools[name] = PoolOffer{Slots: n}
	}
	return pools, nil
}

func atoiOrZero(meta map[string]string, key string) (int, error) {
	s, ok := meta[key]
	if !ok || s == "" {
		return 0, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("meta %s=%q: want a count", key, s)
	}
	return n, nil
}

func boolOrFalse(meta map[string]string, key string) (bool, error) {
	s, ok := meta[key]
	if !ok || s == "" {
		return false, nil
	}
	b, err := strconv.ParseBool(s)
	if err != nil {
		return false, fmt.Errorf("meta %s=%q: want true or false", key, s)
	}
	return b, nil
}
