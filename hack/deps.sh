#!/usr/bin/env bash
# Makes a fresh Debian 12 machine ready to build, test and run Caisson. Idempotent.
# Changes nothing outside this checkout except Debian packages, one system user (and Go's
# module and build caches):
#   - apt packages Caisson needs, installed only if missing;
#   - the system user caisson-qemu (no home, no shell, no password), whom the runtime's
#     jailer runs each VM's QEMU as (hypervisor.jailer, docs/security.md);
#   - into TOOLS_DIR (default _output/tools, git-ignored): containerd, ctr and
#     containerd-shim-runc-v2 at the version go.mod pins, and the CNI plugins.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${1:-$PWD/_output/tools}
mkdir -p "$tools/bin" "$tools/cni"

step() { printf '\033[1m>> %s\033[0m\n' "$*"; }

# --- Debian packages --------------------------------------------------------------------
# What the build, the tests and the runtime read from the system, each as the file Caisson
# uses and the Debian package that provides it. A package is installed when one of its files
# is missing (a package can be "installed" without a file the build needs: protobuf-compiler
# without recommends lacks the well-known .proto files, which libprotobuf-dev holds); after
# the install every file is checked again, and one still missing stops here by name.
requirements=(
	# the VMM, its image tool and virtio-fs daemon
	"/usr/bin/qemu-system-x86_64      qemu-system-x86"
	"/usr/bin/qemu-img                qemu-utils"
	"/usr/lib/qemu/virtiofsd          qemu-system-common"
	# layer (EROFS) and writable (ext4) images
	"/usr/bin/mkfs.erofs              erofs-utils"
	"/sbin/mkfs.ext4                  e2fsprogs"
	"/sbin/debugfs                    e2fsprogs"
	# test images, initramfs inspection, guest module metadata
	"/bin/busybox                     busybox-static"
	"/bin/cpio                        cpio"
	"/sbin/depmod                     kmod"
	# pod networking; runc for baseline comparisons
	"/sbin/ip                         iproute2"
	"/usr/sbin/iptables               iptables"
	"/usr/sbin/runc                   runc"
	# make protos / make check: protoc and the well-known types the API imports
	"/usr/bin/protoc                  protobuf-compiler"
	"/usr/include/google/protobuf/any.proto        libprotobuf-dev"
	"/usr/include/google/protobuf/empty.proto      libprotobuf-dev"
	"/usr/include/google/protobuf/timestamp.proto  libprotobuf-dev"
	# the static guest agent: cgo, runc's libcontainer with seccomp
	"/usr/bin/gcc                     gcc"
	"/usr/lib/x86_64-linux-gnu/libc.a libc6-dev"
	"/usr/include/seccomp.h           libseccomp-dev"
	"/usr/lib/x86_64-linux-gnu/libseccomp.a libseccomp-dev"
	"/usr/bin/make                    make"
	"/usr/bin/git                     git"
	"/etc/ssl/certs/ca-certificates.crt ca-certificates"
)
# missing_files prints "FILE PACKAGE" for each requirement whose file is absent.
missing_files() {
	local r f p
	for r in "${requirements[@]}"; do
		read -r f p <<<"$r"
		[[ -e $f ]] || echo "$f $p"
	done
}
mapfile -t missing < <(missing_files)
if ((${#missing[@]})); then
	packages=$(for m in "${missing[@]}"; do echo "${m##* }"; done | sort -u | tr '\n' ' ')
	step "installing Debian packages: $packages"
	[[ $(id -u) == 0 ]] || {
		echo "missing (run as root to install their packages):" >&2
		for m in "${missing[@]}"; do echo "  ${m% *} (package ${m##* })" >&2; done
		exit 1
	}
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	# shellcheck disable=SC2086
	apt-get install -y -qq --no-install-recommends $packages >/dev/null
	mapfile -t missing < <(missing_files)
	if ((${#missing[@]})); then
		echo "still missing after installing their packages:" >&2
		for m in "${missing[@]}"; do echo "  ${m% *} (package ${m##* })" >&2; done
		exit 1
	fi
else
	step "Debian packages: every file present"
fi

# --- the jail's user ------------------------------------------------------------------------
# QEMU runs as this user (hypervisor.jailer.user), in a mount namespace holding only its files.
jail_user=caisson-qemu
if getent passwd "$jail_user" >/dev/null; then
	step "jail user $jail_user: present"
else
	[[ $(id -u) == 0 ]] || { echo "the jail user $jail_user is missing (run as root to create it)" >&2; exit 1; }
	step "creating the system user $jail_user (QEMU's jail)"
	useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$jail_user"
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
# The stamp names the plugin set too, so that adding a plugin rebuilds them. firewall and
# tuning complete nerdctl's default bridge network (bridge, portmap, firewall, tuning).
stamp="$tools/cni/.plugins-$cni_version-firewall-tuning"
if [[ ! -f $stamp ]]; then
	step "building CNI plugins $cni_version (bridge, host-local, loopback, portmap, firewall, tuning)"
	GOBIN="$tools/cni" go install \
		"github.com/containernetworking/plugins/plugins/main/bridge@$cni_version" \
		"github.com/containernetworking/plugins/plugins/main/loopback@$cni_version" \
		"github.com/containernetworking/plugins/plugins/ipam/host-local@$cni_version" \
		"github.com/containernetworking/plugins/plugins/meta/portmap@$cni_version" \
		"github.com/containernetworking/plugins/plugins/meta/firewall@$cni_version" \
		"github.com/containernetworking/plugins/plugins/meta/tuning@$cni_version"
	rm -f "$tools/cni"/.plugins-*
	touch "$stamp"
else
	step "CNI plugins $cni_version: built"
fi
# --- busybox, dynamically linked, for critest's look-alike images -----------------------------
# busybox-static's sh runs applets such as ls in its own process (Debian builds it with
# FEATURE_SH_STANDALONE), so masking /bin/ls (critest's MaskedPaths) would change nothing in
# an image made of it; Debian's dynamically linked busybox execs them, as the sh of the real
# busybox image does. The two packages conflict: this one is unpacked here, not installed
# (integration-tests/critest adds the host's libc it links to its images).
if [[ -x $tools/busybox/bin/busybox ]]; then
	step "busybox (dynamically linked, for critest's images): unpacked"
else
	step "unpacking Debian's dynamically linked busybox (for critest's images) into $tools/busybox"
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	# No package lists on a machine that lacked no package (apt-get update never ran above):
	# update them and retry.
	if ! (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root busybox); then
		[[ $(id -u) == 0 ]] || { echo "apt-get download busybox failed (run as root to update the package lists)" >&2; exit 1; }
		apt-get update -qq
		(cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root busybox)
	fi
	dpkg-deb -x "$tmp"/busybox_*.deb "$tmp/root"
	install -D -m 0755 "$tmp/root/bin/busybox" "$tools/busybox/bin/busybox"
fi
step "dependencies ready (tools in $tools)"
