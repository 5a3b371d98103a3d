# snakepit: the front door. `make` lists the targets.

SHELL := /bin/bash
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/snakepit/snakepit/pkg/agent.Version=$(VERSION) -X main.version=$(VERSION)
BIN := bin
TOOLS := $(CURDIR)/.tools/bin
CONSUL := $(CURDIR)/.cache/bin/consul

# Pinned code generators (make proto).
BUF_VERSION := v1.75.0
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: build
build: ## Build snakepitd and spctl into bin/
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/snakepitd ./cmd/spctl

.PHONY: run
run: build ## Build and start snakepitd standalone with the example adapter (Ctrl-C stops it)
	$(BIN)/snakepitd

.PHONY: consul
consul: ## Build the Consul agent the tests use (cached in .cache/bin)
	./scripts/install-consul.sh

.PHONY: test
test: consul ## Run every test with the race detector (real Python, real Consul)
	SNAKEPIT_CONSUL=$(CONSUL) SNAKEPIT_REQUIRE_CONSUL=1 $(GO) test -race -count=1 -timeout 25m ./...

.PHONY: test-short
test-short: ## Run the tests that need neither Consul nor long chaos loops
	$(GO) test -race -short -count=1 ./...

.PHONY: bench
bench: build consul ## Measure speed and memory against floors measured in the same run
	SNAKEPIT_CONSUL=$(CONSUL) $(GO) run ./cmd/spbench -daemon $(BIN)/snakepitd
	$(GO) test -run '^$$' -bench . -benchmem ./pkg/router/

.PHONY: proto
proto: $(TOOLS)/buf $(TOOLS)/protoc-gen-go $(TOOLS)/protoc-gen-go-grpc ## Regenerate the Go code of proto/ (pinned generators)
	$(TOOLS)/buf lint
	$(TOOLS)/buf generate

$(TOOLS)/buf:
	GOBIN=$(TOOLS) $(GO) install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)
$(TOOLS)/protoc-gen-go:
	GOBIN=$(TOOLS) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
$(TOOLS)/protoc-gen-go-grpc:
	GOBIN=$(TOOLS) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)

.PHONY: check
check: proto ## vet, gofmt, fresh generated code, and spctl's dependency firewall
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting"; exit 1; }
	@git diff --exit-code -- proto/ || { echo "generated code in proto/ is stale: run make proto and commit"; exit 1; }
	@bad=$$($(GO) list -deps ./cmd/spctl | grep -E 'snakepit/pkg/(agent|worker|router|discovery|hw)|go-nvml|hashicorp/consul' || true); \
	  if [ -n "$$bad" ]; then echo "spctl must not depend on:"; echo "$$bad"; exit 1; fi
	@echo "check: ok"

PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: install
install: build ## Install binaries, the systemd unit and an example config (PREFIX, DESTDIR)
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)/etc/systemd/system $(DESTDIR)/etc/snakepit $(DESTDIR)$(PREFIX)/share/doc/snakepit
	install -m 0755 $(BIN)/snakepitd $(BIN)/spctl $(DESTDIR)$(PREFIX)/bin/
	sed 's|/usr/local/|$(PREFIX)/|g' deploy/systemd/snakepitd.service > $(DESTDIR)/etc/systemd/system/snakepitd.service
	test -e $(DESTDIR)/etc/snakepit/snakepitd.yaml || install -m 0644 configs/snakepitd.yaml $(DESTDIR)/etc/snakepit/snakepitd.yaml
	install -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/snakepit/
	@echo "installed; then: useradd --system snakepit; systemctl daemon-reload; systemctl enable --now snakepitd"

.PHONY: tidy
tidy: ## go mod tidy
	$(GO) mod tidy

.PHONY: clean
clean: ## Remove build outputs
	rm -rf $(BIN)
