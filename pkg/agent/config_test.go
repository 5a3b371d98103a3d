package agent

import (
	"strings"
	"testing"
	"time"
)

func TestRouterConfigErrorsNameTheKey(t *testing.T) {
	cfg := testConfig(t)
	cfg.Router.RetryBudgetRatio = 2
	cfg.Router.BreakGlassLease = -time.Second
	err := cfg.Validate()
	for _, want := range []string{"router.retry_budget_ratio", "router.break_glass_lease"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate() = %v, want it to name %s", err, want)
		}
	}
}
