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
//   - the logarithm uses only integer operations, IEEE-754 +, -, *, / and
//     tables that the same operations build at start-up, with every product
//     that feeds an addition wrapped in float64(), which the Go spec
//     defines to round, so no compiler may fuse it into an FMA (arm64,
//     ppc64 and s390x would otherwise round differently from amd64);
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

// negLog returns about -ln(n·2^-53) for n in [1, 2^53): an Exp(1) draw
// from the uniform u = n·2^-53. Ranking scores every peer of a small pool
// with it, so it is short, and has no branch and no division.
//
// float64(n) = M·2^(e-1023) exactly, M in [1, 2). The top 8 bits of M's
// fraction pick j, an interval of width 1/256, whose midpoint c has the
// rounded inverse logInvC[j] and ln(1/logInvC[j]) = logLnC[j], and
//
//	-ln(u) = (1076-e)·ln2 - logLnC[j] - ln(1+r),  r = M·logInvC[j] - 1,
//
// |r| <= 2^-9, ln(1+r) by three terms of its series, r - r²/2 + r³/3
// (relative error below r³/4: 2e-9, TestNegLog). The last interval, M just
// below 2, takes c = 2: there r = M/2 - 1 is exact, and for u in
// [1-2^-9, 1), where the winners among many peers are, the first two terms
// cancel exactly (ln2 - ln2), so -ln(u) = -ln(1+r) = v + v²/2 + v³/3 with
// v = 1-u keeps its relative accuracy as u -> 1 and is never below v, which
// pruning relies on. As in the rest of this file, every product feeding an
// addition is wrapped in float64() so that no compiler fuses it.
func negLog(n uint64) float64 {
	b := math.Float64bits(float64(int64(n))) // exact: n < 2^53
	j := uint8(b >> 44)
	r := float64(math.Float64frombits(b&(1<<52-1)|1023<<52)*logInvC[j]) - 1
	l := r + float64(float64(r*r)*float64(float64(r*(1.0/3))-0.5))
	return zLn2[uint8(b>>52)] - logLnC[j] - l
}

// logInvC[j] is, for M in [1+j/256, 1+(j+1)/256), 1/c rounded, with c the
// interval's midpoint (2 for the last one); logLnC[j] is ln(1/logInvC[j])
// (the log of the rounded inverse, not of c, so that rounding costs
// nothing). zLn2[uint8(e)] is (1076-e)·ln2 for the exponents e of
// float64(n), 1023 to 1075. All are computed once by deterministic
// arithmetic (negLogExact), never modified.
var logInvC, logLnC = func() (inv, ln [256]float64) {
	for j := range inv {
		c := 1 + float64((float64(j)+0.5)/256)
		if j == 255 {
			c = 2
		}
		inv[j] = 1 / c                                               // in [1/2, 1)
		ln[j] = negLogExact(uint64(int64(float64(inv[j] * 0x1p53)))) // exact
	}
	return inv, ln
}()

var zLn2 = func() (z [256]float64) {
	for e := 1023; e <= 1075; e++ {
		z[uint8(e)] = float64(1076-e) * math.Ln2
	}
	return z
}()

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

// negLogExact returns -ln(n·2^-53) for n in [1, 2^53): the fdlibm
// algorithm (error below 1 ulp) written so that it rounds identically
// everywhere. It builds logLnC.
func negLogExact(n uint64) float64 {
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

// Ranking keys. A peer's score is negLog(draw)/slots. Rank compares scores
// as integers: a positive float64's bits order like its value, so the key
// is the score's bits with the low idxBits replaced by the peer's position
// in its span. Truncating the score there (to 32 significant bits, a
// relative step of 2^-32, below negLog's error) makes every key unique and
// breaks ties by position, that is by ID (spans follow the Table's order,
// which is by ID), as the contract says; and an integer minimum compiles to
// a conditional move, so the top-k insertion has no branch to mispredict.
const (
	idxBits = 20
	idxMask = 1<<idxBits - 1
	// maxPeers is the most peers a Table may hold: a position must fit in
	// a key's idxBits.
	maxPeers = 1 << idxBits
)

// scoreKey returns the ranking key of the peer at position pos whose draw
// is d and whose w is 2^-53/slots (hotSlot.w): negLog(d)·w is the score
// scaled by 2^-53, exactly (scaling by a power of two commutes with
// rounding), which orders the same. The ranking loops inline it by hand.
func scoreKey(d uint64, w float64, pos int) uint64 {
	return math.Float64bits(negLog(d)*w)&^idxMask | uint64(pos)
}

// keyScore returns the score a key stands for (truncated as in the key).
func keyScore(key uint64) float64 {
	return math.Float64frombits(key&^idxMask) * 0x1p53
}

// pruneBound returns the float64 b such that a peer with 1-u = v·2^-53
// and v·w > b (w as in scoreKey) cannot have a key below key. -ln(u) >=
// (1-u)·(1 + (1-u)/2), and negLog keeps that margin up to its rounding
// error (a few ulps; its series is cut well below the margin), which the
// 2^-32 relative slack added here, over the key's own truncation step,
// covers many times.
func pruneBound(key uint64) float64 {
	return math.Float64frombits(key|idxMask+2<<idxBits) * 0x1p53
}
