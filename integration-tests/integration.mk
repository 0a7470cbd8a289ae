# CRI integration: Caisson pods through containerd's CRI plugin (integration-tests/cri*_test.go).

.PHONY: test-cri
test-cri: binaries guest ## CRI tests (root): pod lifecycle, networking, streaming, bad input, 5 concurrent pods, contrib snippets, nerdctl's calls
	$(GO) test -count=1 -p 1 -timeout 30m -run '^Test(CRI|Contrib|Nerdctl)' -v ./integration-tests/

.PHONY: bench-cri
bench-cri: ## CRI pod start (RunPodSandbox -> first app container Running), median of 10: caisson vs runc, and vs a bare guest boot
	$(GO) test -count=1 -run '^$$' -bench '^BenchmarkCRIPodStart$$' -benchtime 10x -timeout 30m ./integration-tests/
