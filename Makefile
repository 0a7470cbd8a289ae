# Caisson — VM-isolated containers as drop-in containerd plugins.
# `make help` lists the targets. Component-specific rules live in */*.mk fragments.

SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := binaries

ROOT      := $(CURDIR)
BIN_DIR   := $(ROOT)/bin
OUT_DIR   := $(ROOT)/_output
TOOLS_DIR := $(OUT_DIR)/tools
GUEST_DIR := $(OUT_DIR)/guest
GO        ?= go

VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
REVISION ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
PKG      := github.com/caisson-containers/caisson
LDFLAGS  := -X $(PKG)/version.Version=$(VERSION) -X $(PKG)/version.Revision=$(REVISION)

# Host binaries: every command under cmd/ but the guest's caisson-agent, which
# guest/guest.mk builds (it is a static cgo binary).
HOST_COMMANDS := $(filter-out caisson-agent,$(notdir $(wildcard cmd/*)))

export PATH := $(TOOLS_DIR)/bin:$(PATH)

include guest/kernel/versions.mk
-include hack/*.mk guest/*.mk snapshotter/*.mk shim/*.mk integration-tests/*.mk

.PHONY: help
help: ## Show this help
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | sort -u | \
		awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

.PHONY: all
all: binaries guest ## Build the host binaries and the guest image

.PHONY: binaries
binaries: $(addprefix $(BIN_DIR)/,$(HOST_COMMANDS)) $(BIN_DIR)/caisson-agent ## Build every binary into bin/

# Go tracks its own dependencies; always ask it (a no-op build is fast).
.PHONY: FORCE
FORCE:

$(BIN_DIR)/%: FORCE
	@mkdir -p $(BIN_DIR)
	$(GO) build -ldflags '$(LDFLAGS)' -o $@ ./cmd/$*

# $(BIN_DIR)/caisson-agent has its own rule in guest/guest.mk: it is a static cgo binary.

.PHONY: deps
deps: ## Install what a fresh Debian 12 machine lacks (apt packages; containerd, CNI plugins into _output/tools)
	hack/deps.sh "$(TOOLS_DIR)"

.PHONY: protos
protos: ## Regenerate the shim<->agent API from api/**/*.proto
	hack/protos.sh generate

.PHONY: check-protos
check-protos: ## Fail if the generated API code is not what the .proto files produce
	hack/protos.sh check

.PHONY: check
check: check-protos ## gofmt, go vet and the proto check
	@out=$$(gofmt -l $$(git ls-files --cached --others --exclude-standard '*.go')); if [[ -n $$out ]]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

.PHONY: test
test: ## Unit tests; then, as root with QEMU present, the root and integration tests
	hack/test.sh

.PHONY: test-unit
test-unit: ## Unit tests only (no root, no QEMU)
	$(GO) test -count=1 ./...

# Every component's fragment defines bench-<component> targets; `make bench` runs them all.
BENCH_TARGETS = $(shell $(MAKE) -pRrq -f $(firstword $(MAKEFILE_LIST)) : 2>/dev/null | \
	awk -F: '/^bench-[a-zA-Z0-9_-]+:/ {print $$1}' | sort -u)

.PHONY: bench
bench: binaries guest ## Benchmarks, each reported as a ratio against a baseline measured in the same run
	@for t in $(BENCH_TARGETS); do printf '\033[1m>> %s\033[0m\n' "$$t"; $(MAKE) --no-print-directory $$t; done

.PHONY: demo
demo: binaries guest ## The main job: a pod in a VM on a private containerd (touches nothing of the host's)
	hack/demo.sh

.PHONY: quickstart
quickstart: deps demo ## On a fresh Debian 12 machine: install what is missing, build, run the demo

.PHONY: clean
clean: ## Remove build outputs (bin/, _output/ except the tools and download cache)
	rm -rf $(BIN_DIR) $(GUEST_DIR)/build
