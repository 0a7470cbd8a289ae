#!/usr/bin/env bash
# Builds containerd and ctr at VERSION from the Go module proxy into OUT/bin, for the
# version-matrix tests (integration-tests/compat_test.go). containerd's go.mod has exclude
# lines, so `go install ...@VERSION` refuses it; a tiny module that requires containerd at
# that version builds its commands instead. Re-running with the same version is a no-op.
#   hack/build-containerd.sh v1.7.29 _output/tools/containerd/v1.7.29
set -euo pipefail
version=$1 out=$2
case $version in
v1.*) module=github.com/containerd/containerd ;;
v2.*) module=github.com/containerd/containerd/v2 ;;
*) echo "unknown containerd version $version" >&2; exit 2 ;;
esac
stamp="$out/bin/.built"
[[ -f $stamp && $(cat "$stamp") == "$version" ]] && exit 0
mkdir -p "$out/src" "$out/bin"
cd "$out/src"
cat >go.mod <<MOD
module caisson.test/containerd-matrix

go 1.23
MOD
# GOFLAGS=-mod=mod: the module's requirements come from `go get` alone (no tidy: nothing
# here imports containerd, the commands are built from the dependency itself).
export GOFLAGS=-mod=mod GOTOOLCHAIN=local
go get "$module/cmd/containerd@$version" "$module/cmd/ctr@$version" >/dev/null 2>&1 ||
	go get "$module/cmd/containerd@$version" "$module/cmd/ctr@$version"
for cmd in containerd ctr; do
	go build -o "$out/bin/$cmd" "$module/cmd/$cmd"
done
echo "$version" >"$stamp"
