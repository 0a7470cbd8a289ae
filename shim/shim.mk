# The runtime's benchmarks (integration-tests/bench_test.go): each reports a ratio or a
# size against a baseline measured in the same run.

.PHONY: bench-shim
bench-shim: ## Shim: second container create+start vs runc; idle pod PSS (QEMU + shim), booted and from a VM template
	$(GO) test -count=1 -run '^$$' -bench '^BenchmarkPod(SecondContainer|IdleMemory|sIdleMemoryTemplate)$$' -benchtime 1x -timeout 20m ./integration-tests/
