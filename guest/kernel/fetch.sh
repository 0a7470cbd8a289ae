#!/usr/bin/env bash
# Fetches the pinned Debian cloud kernel package and unpacks it into OUT:
#   OUT/vmlinuz                       the kernel image (a bzImage; guest.mk extracts the vmlinux the VMs boot)
#   OUT/root/lib/modules/RELEASE/...  its modules, for the initramfs builder
# Re-running with the same pin is a no-op (the .deb is cached and the stamp matches).
set -euo pipefail
package=$1 version=$2 release=$3 out=$4
stamp="$out/.stamp"
want="$package=$version"
if [[ -f $stamp && $(cat "$stamp") == "$want" && -f $out/vmlinuz ]]; then
	exit 0
fi
cache="$out/../cache"
mkdir -p "$cache"
deb="$cache/${package}_${version}_amd64.deb"
if [[ ! -f $deb ]]; then
	echo ">> downloading guest kernel $want"
	(cd "$cache" && apt-get -o APT::Sandbox::User=root download "$want" >/dev/null) || {
		echo "cannot download $want: run 'apt-get update', or bump guest/kernel/versions.mk to a version 'apt-cache madison $package' lists" >&2
		exit 1
	}
	# apt-get download names the file with an epoch-escaped version; normalise it.
	found=$(ls "$cache"/${package}_*"${version//:/%3a}"*_amd64.deb | head -1)
	[[ $found == "$deb" ]] || mv "$found" "$deb"
fi
rm -rf "$out/root.tmp"
mkdir -p "$out/root.tmp"
dpkg -x "$deb" "$out/root.tmp"
[[ -f $out/root.tmp/boot/vmlinuz-$release ]] || { echo "package $want has no /boot/vmlinuz-$release" >&2; exit 1; }
rm -rf "$out/root"
mv "$out/root.tmp" "$out/root"
cp "$out/root/boot/vmlinuz-$release" "$out/vmlinuz.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$want" > "$stamp"
