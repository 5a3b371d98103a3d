package agent

import (
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"

	snakepitv1 "github.com/snakepit/snakepit/proto/snakepit/v1"
)

func scrape(t *testing.T, tn *testNode) string {
	t.Helper()
	resp, err := http.Get("http://" + tn.metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET /metrics: %d %v", resp.StatusCode, err)
	}
	return string(b)
}

// metricValue returns the value of the sample with exactly these labels.
func metricValue(t *testing.T, text, name string, labels string) float64 {
	t.Helper()
	re := regexp.MustCompile("(?m)^" + regexp.QuoteMeta(name+"{"+labels+"}") + ` ([0-9.e+-]+)$`)
	m := re.FindStringSubmatch(text)
	if m == nil {
		t.Fatalf("no sample %s{%s} in:\n%s", name, labels, grep(text, name))
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func grep(text, prefix string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func TestMetricsMatchCalls(t *testing.T) {
	tn := startNode(t, testConfig(t))
	for i := 0; i < 7; i++ {
		if _, err := tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "noop"}); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 2; i++ {
		tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "boom", Args: []byte(`{"message": "x"}`)})
	}
	tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "add", Args: []byte(`{"a": 1}`)})
	tn.exec(t, &snakepitv1.ExecuteRequest{Tool: "crash"})
	waitStatus(t, tn, func(p *snakepitv1.PoolStatus) bool { return p.GetReadyWorkers() == 2 })
	text := scrape(t, tn)
	for _, c := range []struct {
		outcome string
		want    float64
	}{{"ok", 7}, {"unknown", 2}, {"invalid_argument", 1}, {"unavailable", 1}} {
		if got := metricValue(t, text, "snakepit_calls_total", `outcome="`+c.outcome+`",pool="test"`); got != c.want {
			t.Errorf("snakepit_calls_total{outcome=%q} = %v, want %v", c.outcome, got, c.want)
		}
	}
	if got := metricValue(t, text, "snakepit_call_seconds_count", `pool="test"`); got != 11 {
		t.Errorf("snakepit_call_seconds_count = %v, want 11", got)
	}
	if got := metricValue(t, text, "snakepit_run_seconds_count", `pool="test"`); got != 7 {
		t.Errorf("snakepit_run_seconds_count = %v, want 7 (successful calls)", got)
	}
	if got := metricValue(t, text, "snakepit_worker_restarts_total", `cause="exit_code",pool="test"`); got != 1 {
		t.Errorf("restarts{exit_code} = %v, want 1", got)
	}
	if got := metricValue(t, text, "snakepit_workers", `pool="test",state="idle"`); got != 2 {
		t.Errorf("idle workers = %v, want 2", got)
	}
	if got := metricValue(t, text, "snakepit_queue_depth", `pool="test"`); got != 0 {
		t.Errorf("queue depth = %v, want 0", got)
	}
	if got := metricValue(t, text, "snakepit_pool_ready", `pool="test",state="ready"`); got != 1 {
		t.Errorf("pool ready = %v, want 1", got)
	}
}
