#!/usr/bin/env bash
# Makes a fresh Debian 12 machine ready to build, test and run Caisson. Idempotent.
# Changes nothing outside this checkout except Debian packages:
#   - apt packages Caisson needs, installed only if missing;
#   - into TOOLS_DIR (default _output/tools, git-ignored): containerd, ctr and
#     containerd-shim-runc-v2 at the version go.mod pins, and the CNI plugins.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${1:-$PWD/_output/tools}
mkdir -p "$tools/bin" "$tools/cni"

step() { printf '\033[1m>> %s\033[0m\n' "$*"; }

# --- Debian packages --------------------------------------------------------------------
packages=(
	qemu-system-x86 qemu-utils   # the VMM
	erofs-utils e2fsprogs        # layer (EROFS) and writable (ext4) images
	busybox-static cpio kmod     # test images, initramfs inspection, module metadata
	iproute2 iptables runc       # pod networking; runc for baseline comparisons
	protobuf-compiler            # make protos
	libseccomp-dev               # the static guest agent (runc's libcontainer with seccomp)
	gcc libc6-dev make git ca-certificates
)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	step "installing ${#missing[@]} Debian packages: ${missing[*]}"
	[[ $(id -u) == 0 ]] || { echo "run as root to install packages" >&2; exit 1; }
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
	step "Debian packages: all present"
fi

# --- containerd, from the version go.mod pins ------------------------------------------------
# containerd's go.mod has exclude lines, so `go install ...@v` refuses it; building its
# commands from this module (which requires it) works and pins the same version.
containerd_version=$(go list -m -f '{{.Version}}' github.com/containerd/containerd/v2)
stamp="$tools/bin/.containerd-$containerd_version"
if [[ ! -f $stamp ]]; then
	step "building containerd $containerd_version, ctr, containerd-shim-runc-v2 (2-4 minutes on 2 cores)"
	for cmd in containerd ctr containerd-shim-runc-v2; do
		echo "   $cmd"
		go build -o "$tools/bin/$cmd" "github.com/containerd/containerd/v2/cmd/$cmd"
	done
	rm -f "$tools/bin"/.containerd-*
	touch "$stamp"
else
	step "containerd $containerd_version: built"
fi

# --- CNI plugins -----------------------------------------------------------------------------
cni_version=v1.9.1
stamp="$tools/cni/.plugins-$cni_version"
if [[ ! -f $stamp ]]; then
	step "building CNI plugins $cni_version (bridge, host-local, loopback, portmap)"
	GOBIN="$tools/cni" go install \
		"github.com/containernetworking/plugins/plugins/main/bridge@$cni_version" \
		"github.com/containernetworking/plugins/plugins/main/loopback@$cni_version" \
		"github.com/containernetworking/plugins/plugins/ipam/host-local@$cni_version" \
		"github.com/containernetworking/plugins/plugins/meta/portmap@$cni_version"
	rm -f "$tools/cni"/.plugins-*
	touch "$stamp"
else
	step "CNI plugins $cni_version: built"
fi
step "dependencies ready (tools in $tools)"
