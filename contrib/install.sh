#!/usr/bin/env bash
# Installs Caisson from a built checkout (`make binaries guest`) onto this host:
#   $PREFIX/bin (default /usr/local/bin): containerd-shim-caisson-v2, caisson-snapshotter, caisson
#   /usr/share/caisson: the guest kernel (vmlinux, booted directly), initramfs and modules image
#   /etc/caisson/config.toml (runtime, from `caisson config default`), /etc/caisson/snapshotter.toml
#   /etc/systemd/system: caisson-snapshotter.service and a containerd.service drop-in
#   the system user caisson-qemu, whom QEMU's jail runs as (not with DESTDIR)
#   /etc/containerd/config.toml from contrib/containerd/config.toml, only if there is none;
#     otherwise the snippet goes to /etc/containerd/caisson.toml for you to merge.
# Existing configuration files are never overwritten. DESTDIR installs into a staging root
# (nothing else is touched); without DESTDIR, pass --enable to reload systemd and start the
# snapshotter (containerd must be restarted by you to load the new configuration).
# Tested: integration-tests/cri_contrib_test.go (TestContribInstall) installs into a scratch DESTDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
enable=false
[[ ${1:-} == --enable ]] && enable=true

step() { printf '\033[1m>> %s\033[0m\n' "$*"; }
for f in bin/containerd-shim-caisson-v2 bin/caisson-snapshotter bin/caisson _output/guest/vmlinux _output/guest/initramfs.cpio.lz4 _output/guest/modules.erofs; do
	[[ -e $f ]] || { echo "missing $f: run \`make binaries guest\` first" >&2; exit 1; }
done

# config installs $2 at $1 unless a file is already there.
config() {
	if [[ -e $DESTDIR$1 ]]; then
		echo "   $1 exists: kept (the new one would have been $2)"
	else
		install -D -m 0644 "$2" "$DESTDIR$1"
		echo "   $1"
	fi
}

step "binaries into $PREFIX/bin"
install -d "$DESTDIR$PREFIX/bin"
install -m 0755 bin/containerd-shim-caisson-v2 bin/caisson-snapshotter bin/caisson "$DESTDIR$PREFIX/bin/"

step "guest kernel, initramfs and modules image into /usr/share/caisson"
install -D -m 0644 _output/guest/vmlinux "$DESTDIR/usr/share/caisson/vmlinux"
install -D -m 0644 _output/guest/initramfs.cpio.lz4 "$DESTDIR/usr/share/caisson/initramfs.cpio.lz4"
# Beside the kernel: the shim attaches it to every pod VM (docs/guest.md).
install -D -m 0644 _output/guest/modules.erofs "$DESTDIR/usr/share/caisson/modules.erofs"

step "configuration"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Run the installed binary: outside a checkout it defaults to /usr/share/caisson's guest.
"$DESTDIR$PREFIX/bin/caisson" config default >"$tmp/config.toml"
config /etc/caisson/config.toml "$tmp/config.toml"
# Installs before the kernel was a vmlinux shipped the bzImage, and their config.toml names it.
if grep -q '^kernel = "/usr/share/caisson/vmlinuz"' "$DESTDIR/etc/caisson/config.toml"; then
	echo "   /etc/caisson/config.toml boots the previous install's kernel, /usr/share/caisson/vmlinuz: set its guest.kernel to /usr/share/caisson/vmlinux (then remove vmlinuz)"
fi
config /etc/caisson/snapshotter.toml contrib/snapshotter/config.toml
if [[ -e $DESTDIR/etc/containerd/config.toml ]]; then
	install -D -m 0644 contrib/containerd/config.toml "$DESTDIR/etc/containerd/caisson.toml"
	echo "   /etc/containerd/config.toml exists: merge /etc/containerd/caisson.toml into it (docs/cri.md)"
else
	config /etc/containerd/config.toml contrib/containerd/config.toml
fi

# QEMU's jail runs as this system user (hypervisor.jailer.user in /etc/caisson/config.toml).
step "the jail's user caisson-qemu"
if [[ -n $DESTDIR ]]; then
	echo "   not created in a DESTDIR install: useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin caisson-qemu"
elif getent passwd caisson-qemu >/dev/null; then
	echo "   present"
else
	useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin caisson-qemu
	echo "   created"
fi

step "systemd units"
sed "s|/usr/local/bin/|$PREFIX/bin/|" contrib/snapshotter/caisson-snapshotter.service >"$tmp/caisson-snapshotter.service"
install -D -m 0644 "$tmp/caisson-snapshotter.service" "$DESTDIR/etc/systemd/system/caisson-snapshotter.service"
install -D -m 0644 contrib/systemd/containerd.service.d/caisson.conf "$DESTDIR/etc/systemd/system/containerd.service.d/caisson.conf"
echo "   /etc/systemd/system/caisson-snapshotter.service, containerd.service.d/caisson.conf"

if $enable && [[ -z $DESTDIR ]]; then
	step "enabling caisson-snapshotter"
	systemctl daemon-reload
	systemctl enable --now caisson-snapshotter.service
	echo "   restart containerd to load its new configuration: systemctl restart containerd"
fi
step "installed${DESTDIR:+ into $DESTDIR}"
