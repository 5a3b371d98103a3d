package router

import (
	"math"
	"math/bits"
)

// The hash functions and the logarithm below decide which node owns a
// session. Every router in a fleet must compute the same owner, across
// processes, restarts, daemon versions and CPU architectures, so:
//
//   - the string hash has fixed constants (no per-process seed);
//   - the logarithm uses only IEEE-754 +, -, *, / with every product that
//     feeds an addition wrapped in float64(), which the Go spec defines to
//     round, so no compiler may fuse it into an FMA (arm64, ppc64 and s390x
//     would otherwise round differently from amd64);
//   - any change to these functions remaps sessions and is a breaking change
//     of the routing contract (TestGoldenOwners pins them).

const (
	k0 = 0xa0761d6478bd642f
	k1 = 0xe7037ed1a0b428db
	k2 = 0x8ebc6af09c88c6e3
)

// mum multiplies a and b to 128 bits and folds the halves.
func mum(a, b uint64) uint64 {
	hi, lo := bits.Mul64(a, b)
	return hi ^ lo
}

// mix is the splitmix64 finaliser: a bijection with full avalanche.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

func le64(s string) uint64 {
	_ = s[7]
	return uint64(s[0]) | uint64(s[1])<<8 | uint64(s[2])<<16 | uint64(s[3])<<24 |
		uint64(s[4])<<32 | uint64(s[5])<<40 | uint64(s[6])<<48 | uint64(s[7])<<56
}

func le32(s string) uint64 {
	_ = s[3]
	return uint64(s[0]) | uint64(s[1])<<8 | uint64(s[2])<<16 | uint64(s[3])<<24
}

// hashString is a fixed-seed 64-bit hash of s in the style of wyhash: 16
// bytes per 128-bit multiply, overlapping reads for the tail. It does not
// allocate and gives the same value on every platform.
func hashString(s string) uint64 {
	h := k0 ^ uint64(len(s))*k2
	for len(s) > 16 {
		h = mum(le64(s)^k1, le64(s[8:])^h)
		s = s[16:]
	}
	var a, b uint64
	switch n := len(s); {
	case n >= 8:
		a, b = le64(s), le64(s[n-8:])
	case n >= 4:
		a, b = le32(s), le32(s[n-4:])
	case n > 0:
		a = uint64(s[0])<<16 | uint64(s[n>>1])<<8 | uint64(s[n-1])
	}
	return mix(mum(a^k1, b^h) ^ h)
}

// draw turns the pair (session hash, peer key) into the odd integer n in
// [1, 2^53) that stands for the uniform u = n·2^-53 in (0, 1). Both n and
// 1-u are exact in a float64. The peer key is the peer's ID hash xor k2
// (peerKey), computed once per Table; the session hash is xored with k1.
// One 128-bit multiply of the two, halves folded, is the mixing step of
// wyhash: both inputs are already uniform, and TestDrawIndependence checks
// that rankings of two and three peers come out uniform.
func draw(sessionHash, peerKey uint64) uint64 {
	return mum(sessionHash^k1, peerKey)>>11 | 1
}

// peerKey is the per-peer input of draw.
func peerKey(id NodeID) uint64 { return hashString(string(id)) ^ k2 }

// Coefficients of the fdlibm logarithm (also Go's math.Log).
const (
	ln2Hi = 6.93147180369123816490e-01 // 3fe62e42 fee00000
	ln2Lo = 1.90821492927058770002e-10 // 3dea39ef 35793c76
	lg1   = 6.666666666666735130e-01   // 3FE55555 55555593
	lg2   = 3.999999999940941908e-01   // 3FD99999 9997FA04
	lg3   = 2.857142874366239149e-01   // 3FD24924 94229359
	lg4   = 2.222219843214978396e-01   // 3FCC71C5 1D8E78AF
	lg5   = 1.818357216161805012e-01   // 3FC74664 96CB03DE
	lg6   = 1.531383769920937332e-01   // 3FC39A09 D078C69F
	lg7   = 1.479819860511658591e-01   // 3FC2F112 DF3E5244
)

// negLog returns -ln(n·2^-53) for n in [1, 2^53): the fdlibm algorithm
// (error below 1 ulp) written so that it rounds identically everywhere.
func negLog(n uint64) float64 {
	b := math.Float64bits(float64(n)) // exact: n < 2^53
	e := int(b>>52) - 1023            // float64(n) = m·2^e, m in [1, 2)
	m := math.Float64frombits(b&(1<<52-1) | 1023<<52)
	if m >= math.Sqrt2 {
		m *= 0.5
		e++
	}
	f := m - 1 // exact; in [sqrt(2)/2-1, sqrt(2)-1)
	k := float64(e - 53)
	s := f / (2 + f)
	s2 := float64(s * s)
	s4 := float64(s2 * s2)
	t1 := float64(s2 * float64(lg1+float64(s4*float64(lg3+float64(s4*float64(lg5+float64(s4*lg7)))))))
	t2 := float64(s4 * float64(lg2+float64(s4*float64(lg4+float64(s4*lg6)))))
	r := t1 + t2
	hfsq := float64(float64(0.5*f) * f)
	ln := float64(k*ln2Hi) - ((hfsq - (float64(s*float64(hfsq+r)) + float64(k*ln2Lo))) - f)
	return -ln
}

// Scoring. A peer's rendezvous score is -ln(u)/w, computed by score() from
// two small tables with linear interpolation, with no division and no call:
//
//   - u >= 1/2 (every contender once a handful of peers has been seen):
//     with v = 1-u (exact), -ln(1-v) = v·g(v), g(v) = 1 + v/2 + v²/3 + ...
//     smooth on [0, 1/2]; relative error below 2e-6, also as v -> 0.
//   - u < 1/2: u = m·2^-e with m in [1, 2), -ln(u) = e·ln2 - ln(m), ln(m)
//     from the second table; absolute error below 2e-6 on a value >= ln 2.
//
// Both grids come from negLog, so they are the same everywhere. An error of
// 3e-6 shifts a peer's share of sessions by at most about that fraction of
// itself, far below anything measurable; the rendezvous properties
// (stability, only the leaving peer's keys move) do not depend on accuracy.

const (
	tableBits = 8
	tableSize = 1 << tableBits // intervals per table
	// v = vi·2^-53 with vi < 2^52: its top tableBits bits pick the
	// interval of the g table, the gShift bits below them the position.
	gShift = 53 - 1 - tableBits
)

type tableEntry struct{ y, slope float64 }

// gTable holds g at v = i/(2·tableSize); lnTable holds ln(m) at
// m = 1 + i/tableSize. Computed once by deterministic arithmetic; never
// modified.
var gTable, lnTable = func() (g, ln [tableSize + 1]tableEntry) {
	for i := range g {
		if i == 0 {
			g[i].y = 1
		} else {
			vi := uint64(i) << gShift // v·2^53
			g[i].y = negLog(1<<53-vi) / (float64(vi) * 0x1p-53)
		}
		// ln(m) = -ln(m/2) - ln 2, with m/2 = n·2^-53.
		ln[i].y = negLog(1<<52) - negLog(uint64(tableSize+i)<<(52-tableBits))
	}
	for i := range tableSize {
		g[i].slope = g[i+1].y - g[i].y
		ln[i].slope = ln[i+1].y - ln[i].y
	}
	return g, ln
}()

// score returns about -ln(d·2^-53)·invW for a draw d (see draw). The
// rendezvous loop inlines its first case; both must stay identical.
func score(d uint64, invW float64) float64 {
	vi := 1<<53 - d // (1-u)·2^53, in [1, 2^53)
	if vi < 1<<52 { // u > 1/2
		lb := float64(float64(int64(vi))*0x1p-53) * invW
		e := &gTable[vi>>gShift]
		g := e.y + float64(float64(vi&(1<<gShift-1))*(1.0/(1<<gShift))*e.slope)
		return lb * g
	}
	l := bits.Len64(d)      // u = m·2^(l-54), m in [1, 2)
	m := d << (64 - l) << 1 // fraction bits of m, left-aligned
	e := &lnTable[m>>(64-tableBits)]
	frac := float64(m<<tableBits>>11) * 0x1p-53
	lnm := e.y + float64(frac*e.slope)
	return (float64(float64(54-l)*math.Ln2) - lnm) * invW
}
