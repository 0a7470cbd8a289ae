# Block snapshotter (snapshotter/, plugins/snapshotter, cmd/caisson-snapshotter).
# Included by the top Makefile.

.PHONY: bench-snapshotter
bench-snapshotter: ## Snapshotter benchmarks (root): unpack vs containerd's overlayfs (ratio), Prepare+Mounts median and 1GiB/1MiB ratio, bytes written per Prepare
	$(GO) test -count=1 -run '^$$' -bench 'BenchmarkUnpack' -benchtime 3x -timeout 30m ./snapshotter/
	$(GO) test -count=1 -run '^$$' -bench 'BenchmarkPrepare' -benchtime 1x -timeout 30m ./snapshotter/

.PHONY: test-snapshotter
test-snapshotter: ## Snapshotter tests, including the root-only ones (conformance suite in-process and through the proxy socket)
	$(GO) test -count=1 ./snapshotter/... ./plugins/snapshotter/... ./cmd/caisson-snapshotter/...
