# CRI integration: Caisson pods through containerd's CRI plugin (integration-tests/cri*_test.go).

.PHONY: test-cri
test-cri: binaries guest ## CRI tests (root): pod lifecycle, networking, streaming, bad input, 5 concurrent pods, contrib snippets, nerdctl's calls
	$(GO) test -count=1 -p 1 -timeout 30m -run '^Test(CRI|Contrib|Nerdctl)' -v ./integration-tests/

.PHONY: bench-cri
bench-cri: ## CRI pod start (RunPodSandbox -> first app container Running), median of 10: caisson vs runc, and vs a bare guest boot
	$(GO) test -count=1 -run '^$$' -bench '^BenchmarkCRIPodStart$$' -benchtime 10x -timeout 30m ./integration-tests/

# critest, cri-tools' CRI validation suite, is a Go test binary: built from the module
# proxy's copy of cri-tools (about 35 s once its modules are downloaded).
CRITEST_VERSION := v1.37.0
CRITEST_FOCUS   ?=

CRITEST_STAMP   := $(TOOLS_DIR)/.critest-$(CRITEST_VERSION)

$(CRITEST_STAMP):
	$(GO) mod download sigs.k8s.io/cri-tools@$(CRITEST_VERSION)
	cd "$$($(GO) env GOMODCACHE)/sigs.k8s.io/cri-tools@$(CRITEST_VERSION)" && \
		GOFLAGS=-mod=mod $(GO) test -c -o $(TOOLS_DIR)/critest ./cmd/critest
	rm -f $(TOOLS_DIR)/.critest-* && touch $@

.PHONY: critest
critest: $(CRITEST_STAMP) ## Build cri-tools' critest $(CRITEST_VERSION) into _output/tools from the Go module proxy

.PHONY: test-critest
test-critest: binaries guest $(CRITEST_STAMP) ## critest (CRI validation, root) with runc as the control then Caisson; results in _output/critest (CRITEST_FOCUS=regexp for a subset)
	CAISSON_CRITEST_FOCUS='$(CRITEST_FOCUS)' $(GO) test -count=1 -timeout 150m -run '^TestCritest$$' -v ./integration-tests/critest/

.PHONY: bench-volumes
bench-volumes: ## Shared volumes (virtio-fs) against the rootfs disk in one pod: 256 MiB sequential write/read, 10,000 files; and an idle pod's memory shared vs copied
	$(GO) test -count=1 -run '^$$' -bench '^BenchmarkCRI(VolumeIO|PodMemorySharedFS)$$' -benchtime 1x -timeout 30m ./integration-tests/

# Density: how many idle pods this machine holds and what each costs (issue 15).
DENSITY_PODS ?= 100
DENSITY_CONFIGS ?= booted,template
# Empty: containerd's default CRI stats_collect_period (1 s in 2.4).
DENSITY_STATS_PERIOD ?=
# Empty: the runtime configuration's hypervisor.tcg_translation_cache_mib (128).
DENSITY_TCG_CACHE_MIB ?=

.PHONY: bench-density
bench-density: ## DENSITY_PODS idle CRI pods (default 100), booted then from a template (DENSITY_CONFIGS=template for one; booted-askguest or template-askguest, the stats reuse off, as its baseline): host memory and PSS per pod (TCG cache apart), idle CPU per pod over 30 s, first/last pod start (and the first/last ten's, with their phases), exec latency, removal; against a bare guest, and the start's growth against as many runc pods
	DENSITY_PODS=$(DENSITY_PODS) DENSITY_CONFIGS=$(DENSITY_CONFIGS) DENSITY_STATS_PERIOD=$(DENSITY_STATS_PERIOD) DENSITY_TCG_CACHE_MIB=$(DENSITY_TCG_CACHE_MIB) $(GO) test -count=1 -run '^$$' -bench '^BenchmarkCRIDensity$$' -benchtime 1x -timeout 240m ./integration-tests/

.PHONY: bench-warm
bench-warm: ## Warm VMs (hypervisor.warm_vms) idle, from a template and booted: a waiting warm VM and a pod that started in one, PSS and idle CPU against an idle pod of its kind
	$(GO) test -count=1 -run '^$$' -bench '^BenchmarkWarmVMCost$$' -benchtime 1x -timeout 20m ./integration-tests/
