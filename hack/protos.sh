#!/usr/bin/env bash
# Generates Go code for the shim<->agent API (api/**/*.proto), or checks that the committed
# code is what the .proto files generate.
#   hack/protos.sh generate   rewrite the *.pb.go files in place
#   hack/protos.sh check      exit 1 and show the difference if they are stale
# protoc comes from Debian (protobuf-compiler); the Go plugins are pinned by go.mod's `tool` lines.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-generate}
module=github.com/caisson-containers/caisson

command -v protoc >/dev/null || { echo "protoc not found (package protobuf-compiler): run 'make deps'" >&2; exit 1; }
# The API imports protobuf's well-known types; Debian ships them apart from protoc.
for wkt in any empty timestamp; do
	[[ -f /usr/include/google/protobuf/$wkt.proto ]] || {
		echo "/usr/include/google/protobuf/$wkt.proto not found (package libprotobuf-dev): run 'make deps'" >&2
		exit 1
	}
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Lay the protos out under their Go import path, so that the file names registered in the
# protobuf registry ("github.com/caisson-containers/caisson/api/...") cannot collide.
mkdir -p "$work/src/$module" "$work/bin" "$work/out"
protos=$(git ls-files --cached --others --exclude-standard 'api/*.proto')
[[ -n $protos ]] || { echo "no .proto files under api/" >&2; exit 1; }
for p in $protos; do
	mkdir -p "$work/src/$module/$(dirname "$p")"
	cp "$p" "$work/src/$module/$p"
done
go build -o "$work/bin/protoc-gen-go" google.golang.org/protobuf/cmd/protoc-gen-go
go build -o "$work/bin/protoc-gen-go-ttrpc" github.com/containerd/ttrpc/cmd/protoc-gen-go-ttrpc

for dir in $(for p in $protos; do dirname "$p"; done | sort -u); do
	PATH="$work/bin:$PATH" protoc -I "$work/src" -I /usr/include \
		--go_out="$work/out" --go_opt=paths=import \
		--go-ttrpc_out="$work/out" --go-ttrpc_opt=paths=import \
		"$work/src/$module/$dir"/*.proto
done

generated=$(cd "$work/out/$module" && find . -name '*.pb.go' | sed 's#^\./##' | sort)
case $mode in
generate)
	# Remove stale generated files (a .proto that was deleted or renamed), then copy.
	git ls-files --cached --others --exclude-standard 'api/*.pb.go' | xargs -r rm -f
	for f in $generated; do cp "$work/out/$module/$f" "$f"; done
	echo "generated: $(echo $generated | wc -w) files"
	;;
check)
	status=0
	committed=$(git ls-files --cached --others --exclude-standard 'api/*.pb.go' | sort)
	if [[ $committed != "$generated" ]]; then
		echo "generated files differ from the committed ones:" >&2
		diff <(echo "$committed") <(echo "$generated") >&2 || true
		status=1
	fi
	for f in $generated; do
		if ! diff -u "$f" "$work/out/$module/$f" >/dev/null 2>&1; then
			echo "stale: $f (run 'make protos')" >&2
			diff -u "$f" "$work/out/$module/$f" 2>&1 | head -20 >&2 || true
			status=1
		fi
	done
	[[ $status == 0 ]] && echo "protos up to date"
	exit $status
	;;
*) echo "usage: $0 generate|check" >&2; exit 2 ;;
esac
