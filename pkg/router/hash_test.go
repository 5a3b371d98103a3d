package router

import (
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"regexp"
	"testing"
)

// TestNegLog bounds negLog's error against math.Log (and math.Log1p where
// u is close to 1, so that the reference itself is accurate): relative
// 2e-9 everywhere, which includes u -> 1 where the winners are.
func TestNegLog(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	worst := 0.0
	check := func(n uint64) {
		got := negLog(n)
		u := float64(n) * 0x1p-53
		want := -math.Log(u)
		if u > 0.5 {
			want = -math.Log1p(-float64(1<<53-n) * 0x1p-53)
		}
		if rel := math.Abs(got-want) / want; rel > worst {
			worst = rel
		}
		if rel := math.Abs(got-want) / want; rel > 2e-9 {
			t.Fatalf("negLog(%d) = %v, want %v (relative error %g)", n, got, want, rel)
		}
	}
	// Near u = 1 the score is -ln(1+r) alone: the two table terms must
	// cancel exactly, or a one-ulp residue would swamp -ln(u) ~ 1-u.
	if zLn2[1075&0xff] != logLnC[255] {
		t.Fatalf("ln2 terms differ: %v - %v", zLn2[1075&0xff], logLnC[255])
	}
	for _, n := range []uint64{1, 2, 3, 1 << 20, 1<<52 - 1, 1 << 52, 1<<52 + 1, 1<<53 - 1, 1<<53 - 3} {
		check(n)
	}
	for n := uint64(1); n < 1<<53; n = n*5/4 + 1 {
		check(n)
		check(1<<53 - n)
	}
	for range 300000 {
		check(r.Uint64()>>11 | 1)
		check(1<<53 - r.Uint64N(1<<30))                          // u close to 1, where the winners are
		check(0x5a827999fcef3242>>10 + r.Uint64N(1<<20) - 1<<19) // u near sqrt(2)/2, the widest reduction
	}
	t.Logf("worst relative error %.3g", worst)
}

// TestPruneBound checks what pruning relies on: a peer whose bound
// (1-u)·w is above pruneBound(key) has a key above key, checked at the
// edge (keys just below the bound) over the whole range of u.
func TestPruneBound(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	check := func(d uint64, slots int) {
		w := 0x1p-53 / float64(slots)
		lb := float64(float64(int64(1<<53-d)) * w)
		x := scoreKey(d, w, idxMask) // the largest index: the worst case
		// The largest key whose bound lb exceeds: pruneBound(key) < lb.
		key := math.Float64bits(lb*0x1p-53) - 2<<idxBits - 1
		key &^= idxMask
		for pruneBound(key) >= lb {
			key -= 1 << idxBits
		}
		if x <= key {
			t.Fatalf("d=%#x slots=%d: key %#x not above %#x, which prunes it (lb %v)", d, slots, x, key, lb)
		}
	}
	for range 300000 {
		s := 1 + r.IntN(100)
		check(r.Uint64()>>11|1, s)
		check(1<<53-(r.Uint64N(1<<40)|1), s)
		check(1<<53-(r.Uint64N(1<<8)|1), s)
	}
	for d := uint64(1); d < 1<<53; d = d*5/4 + 1 {
		check(d|1, 1)
		check((1<<53-d)|1, 7)
	}
}

// TestDrawIndependence: for random sessions the order of three equal peers
// must be each of the 6 permutations equally often (chi-square, 5 degrees
// of freedom; 30 is beyond the 0.99998 quantile), and each pair of peers
// must split sessions evenly, as independent draws would.
func TestDrawIndependence(t *testing.T) {
	tb := mustTable(t, uniform(3, 1), "")
	const n = 60000
	counts := map[string]int{}
	for i := range n {
		got, err := tb.Rank(Request{SessionID: sessionKey(i), Pool: "p"}, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		counts[fmt.Sprint(ids(got))]++
	}
	if len(counts) != 6 {
		t.Fatalf("orders seen: %v, want all 6", counts)
	}
	chi2 := 0.0
	for _, c := range counts {
		d := float64(c) - n/6.0
		chi2 += d * d / (n / 6.0)
	}
	if chi2 > 30 {
		t.Errorf("orders of 3 peers %v: chi-square %.1f over 5 degrees of freedom, want < 30", counts, chi2)
	}
}

func TestHashStringDistinct(t *testing.T) {
	seen := map[uint64]string{}
	add := func(s string) {
		h := hashString(s)
		if prev, ok := seen[h]; ok && prev != s {
			t.Fatalf("hashString(%q) = hashString(%q) = %#x", s, prev, h)
		}
		seen[h] = s
	}
	add("")
	for i := range 256 {
		add(string(rune(i)))
		add(string([]byte{byte(i)}))
		add(string([]byte{0, byte(i)}))
	}
	for l := range 48 {
		b := make([]byte, l)
		for i := range 5000 {
			for j := range b {
				b[j] = byte(i >> (j % 3 * 4))
			}
			add(string(b))
		}
	}
}

// TestGoldenOwners pins the placement function. Every router of a fleet,
// whatever its version or CPU, must name the same owner for a session, so a
// change here remaps sessions across a rolling upgrade: it is a breaking
// change of the routing contract, not a refactoring.
func TestGoldenOwners(t *testing.T) {
	golden := struct {
		uuidHash  uint64
		scoreBits uint64
		owners    []string // owner and next owner of session-0, session-1, ...
	}{
		uuidHash:  0x75ebc9cec8931ed3,
		scoreBits: 0x3faed1b528800000,
		owners: []string{"011003", "006010", "001013", "001012", "003007", "013011", "009003", "014011",
			"006015", "002007", "009008", "014003", "015008", "012007", "010013", "001003",
			"011015", "011007", "007000", "002001", "009003", "006009", "014015", "014002"},
	}
	if got, want := hashString("3f2c1a9e-7d4b-4c1e-9a8b-2b6d5e4f3a21"), golden.uuidHash; got != want {
		t.Errorf("hashString(uuid) = %#x, want %#x", got, want)
	}
	if got, want := math.Float64bits(keyScore(scoreKey(draw(hashString("s"), peerKey("node-001")), 0x1p-53/4, 0))), golden.scoreBits; got != want {
		t.Errorf("score bits = %#x, want %#x", got, want)
	}
	peers := uniform(16, 1)
	for i := range peers {
		peers[i].Pools["p"] = 1 + i%4
	}
	tb := mustTable(t, peers, "")
	var got []string
	for i := range len(golden.owners) {
		c, err := tb.Rank(Request{SessionID: sessionKey(i), Pool: "p", Max: 2}, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, fmt.Sprint(c[0].ID[5:], c[1].ID[5:]))
	}
	if fmt.Sprint(got) != fmt.Sprint(golden.owners) {
		t.Errorf("owners of session-0.. =\n%q\nwant\n%q", got, golden.owners)
	}
}

// TestNoFusedMultiplyAdd compiles the package for the architectures whose
// compilers fuse x*y+z, and fails if any fused instruction appears: one
// would round differently from amd64 and could name a different owner.
func TestNoFusedMultiplyAdd(t *testing.T) {
	if testing.Short() {
		t.Skip("compiles the package four times")
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command")
	}
	fused := regexp.MustCompile(`(?i)\b(FMADD|FMSUB|FNMADD|FNMSUB|WFMADB|WFMSDB)\w*`)
	for _, arch := range []string{"arm64", "ppc64le", "s390x", "riscv64"} {
		t.Run(arch, func(t *testing.T) {
			cmd := exec.Command(goTool, "build", "-gcflags=-S", "-o", os.DevNull, ".")
			cmd.Env = append(os.Environ(), "GOOS=linux", "GOARCH="+arch, "CGO_ENABLED=0")
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("go build for %s: %v\n%s", arch, err, out)
			}
			if m := fused.Find(out); m != nil {
				t.Errorf("fused multiply-add %q in the %s build: wrap the product in float64()", m, arch)
			}
		})
	}
}
