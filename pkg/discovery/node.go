package discovery

import (
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Limits on published values. Consul allows 64 Meta keys of 128 characters
// and values of 512 characters; these keep a Node well inside that.
const (
	MaxLabels        = 32
	MaxLabelValueLen = 256
	MaxVersionLen    = 64
	MaxDigestLen     = 128
	maxMetaValueLen  = 512
)

var (
	nodeIDRe   = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)
	poolNameRe = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)
	// Label keys become Consul Meta keys (label_<key>), which allow only
	// letters, digits, '_' and '-'.
	labelKeyRe = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$`)
	digestRe   = regexp.MustCompile(`^[\x21-\x7e]*$`)
)

// Validate checks a NodeID.
func (id NodeID) Validate() error {
	if !nodeIDRe.MatchString(string(id)) {
		return fmt.Errorf("node id %q: want 1-128 of [A-Za-z0-9._-], starting with a letter or digit", string(id))
	}
	return nil
}

// Validate checks everything a Registrar would publish. Errors wrap
// ErrInvalidNode and name the field.
func (n Node) Validate() error {
	if err := n.validate(); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidNode, err)
	}
	return nil
}

func (n Node) validate() error {
	if err := n.ID.Validate(); err != nil {
		return err
	}
	if err := validateAddr(n.Addr); err != nil {
		return fmt.Errorf("node addr: %w", err)
	}
	if len(n.Version) > MaxVersionLen || !printable(n.Version) {
		return fmt.Errorf("node version %q: want at most %d printable characters", n.Version, MaxVersionLen)
	}
	if n.ProtoMin < 0 || n.ProtoMax < n.ProtoMin {
		return fmt.Errorf("node protocol range %d-%d: want 0 <= min <= max", n.ProtoMin, n.ProtoMax)
	}
	for name, p := range n.Pools {
		if !poolNameRe.MatchString(name) {
			return fmt.Errorf("pool name %q: want 1-63 of [A-Za-z0-9._-], starting with a letter or digit", name)
		}
		if p.Slots < 0 {
			return fmt.Errorf("pool %q: slots must be >= 0 (got %d)", name, p.Slots)
		}
	}
	if l := len(encodePools(n.Pools)); l > maxMetaValueLen {
		return fmt.Errorf("pools: %d pools encode to %d characters, over the %d Consul allows in one Meta value", len(n.Pools), l, maxMetaValueLen)
	}
	if n.GPUs.Count < 0 {
		return fmt.Errorf("gpu count must be >= 0 (got %d)", n.GPUs.Count)
	}
	for _, m := range n.GPUs.Models {
		if m == "" || !printable(m) {
			return fmt.Errorf("gpu model %q: want printable text", m)
		}
	}
	if l := len(encodeList(n.GPUs.Models)); l > maxMetaValueLen {
		return fmt.Errorf("gpu models encode to %d characters, over %d", l, maxMetaValueLen)
	}
	if err := ValidateLabels(n.Labels); err != nil {
		return err
	}
	if len(n.ToolsDigest) > MaxDigestLen || !digestRe.MatchString(n.ToolsDigest) {
		return fmt.Errorf("tools digest %q: want at most %d printable ASCII characters without spaces", n.ToolsDigest, MaxDigestLen)
	}
	return nil
}

// ValidateLabels checks label keys and values: at most MaxLabels labels,
// keys of 1-63 [A-Za-z0-9_-] starting and ending with a letter or digit
// (they become Consul Meta keys), values of printable UTF-8 up to
// MaxLabelValueLen bytes. Errors name the label as labels[key].
func ValidateLabels(labels map[string]string) error {
	if len(labels) > MaxLabels {
		return fmt.Errorf("labels: %d labels, at most %d allowed", len(labels), MaxLabels)
	}
	keys := make([]string, 0, len(labels))
	for k := range labels {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := labels[k]
		if !labelKeyRe.MatchString(k) {
			return fmt.Errorf("labels[%q]: key must be 1-63 of [A-Za-z0-9_-], starting and ending with a letter or digit", k)
		}
		if len(v) > MaxLabelValueLen || !printable(v) {
			return fmt.Errorf("labels[%q]: value must be printable UTF-8 of at most %d bytes (got %d bytes)", k, MaxLabelValueLen, len(v))
		}
	}
	return nil
}

// validateAddr accepts host:port with a non-wildcard host and a port in
// 1-65535.
func validateAddr(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q: want host:port: %w", addr, err)
	}
	if host == "" {
		return fmt.Errorf("%q: host is empty; publish an address peers can dial", addr)
	}
	if ip, err := netip.ParseAddr(host); err == nil && ip.IsUnspecified() {
		return fmt.Errorf("%q: %s is a wildcard address; publish an address peers can dial", addr, host)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("%q: port must be 1-65535", addr)
	}
	return nil
}

func printable(s string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	return strings.IndexFunc(s, func(r rune) bool { return !unicode.IsPrint(r) }) < 0
}
