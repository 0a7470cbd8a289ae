#!/usr/bin/env bash
# The main job, shown to a newcomer (`make demo`; `make quickstart` runs `make deps` first):
# a private containerd (its own root, state and socket under a temporary directory; nothing
# of the host's containerd is touched) with caisson-snapshotter, a CNI bridge and an image
# registry on 127.0.0.1; a demo image built and pushed there; a pod VM started through the
# CRI with two containers; what the pod sees (guest kernel, rootfs devices, DAX); and
# everything removed, the host's IP forwarding sysctls put back as they were. The walkthrough is integration-tests/cri_demo_test.go (TestDemo),
# driven through containerd's CRI with k8s.io/cri-api as the kubelet does.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/_output/tools/bin:$PATH"
step() { printf '\033[1m>> %s\033[0m\n' "$*"; }

if [[ $(id -u) != 0 ]]; then
	echo "the demo needs root: it starts containerd, QEMU, network namespaces and a bridge" >&2
	exit 1
fi
for f in bin/containerd-shim-caisson-v2 bin/caisson-snapshotter bin/caisson _output/guest/vmlinux _output/tools/bin/containerd _output/tools/cni/bridge; do
	[[ -e $f ]] || { echo "missing $f: run \`make quickstart\` (or \`make deps binaries guest\`)" >&2; exit 1; }
done

# The CNI bridge turns the host's IP forwarding on. The demo's harness puts it back when
# the demo ends (TestDemoLeavesHostForwarding checks that); this trap also covers a demo
# interrupted before its cleanup ran. Globals first: writing them resets each interface's.
declare -A forwarding=()
saved_forwarding=()
for f in /proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv{4,6}/conf/{all,default}/forwarding /proc/sys/net/ipv{4,6}/conf/*/forwarding; do
	[[ -e $f && -z ${forwarding[$f]:-} ]] || continue
	forwarding[$f]=$(<"$f")
	saved_forwarding+=("$f")
done
restore_forwarding() {
	local f
	for f in "${saved_forwarding[@]}"; do
		if [[ -e $f && $(<"$f") != "${forwarding[$f]}" ]]; then
			echo "${forwarding[$f]}" >"$f" || true
		fi
	done
}
trap restore_forwarding EXIT

step "caisson check: what this host offers"
bin/caisson check

step "building the demo driver (go test -c: about a minute the first time)"
mkdir -p _output
go test -c -o _output/demo.test ./integration-tests/

set +e
_output/demo.test -test.run '^TestDemo$' -test.v -test.count=1 -test.timeout 15m | tee _output/demo.log |
	grep --line-buffered -vE '^(=== RUN|--- PASS|PASS$)'
rc=${PIPESTATUS[0]}
set -e
if grep -q -- '--- SKIP' _output/demo.log; then
	echo "the demo could not run (see the SKIP reason above)" >&2
	exit 1
fi
if ((rc != 0)); then
	echo "the demo failed (full log: _output/demo.log)" >&2
	exit "$rc"
fi
step "done: nothing of the demo is left on this machine"
