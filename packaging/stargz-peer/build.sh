#!/usr/bin/env bash
# Builds containerd-stargz-grpc (main.go here) from Debian's Go packages, offline.
#
#   packaging/stargz-peer/build.sh [OUTPUT]   (default /usr/local/libexec/acceld/containerd-stargz-grpc)
#
# Needs golang-go and golang-github-containerd-stargz-snapshotter-dev (install.sh
# --bench-peer installs both). GOPATH mode over /usr/share/gocode, the way Debian builds
# its own Go packages: no module proxy, no network. One file is left out of the build
# with -overlay: the library's CRI registry-config resolver (service/resolver/cri.go),
# which imports k8s.io/cri-api (not in Debian) and which our main never uses; Debian's
# sources stay untouched. Skips the build when OUTPUT was built from the same inputs.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUTPUT="${1:-/usr/local/libexec/acceld/containerd-stargz-grpc}"
GOCODE=/usr/share/gocode
LIBRARY="$GOCODE/src/github.com/containerd/stargz-snapshotter"
EXCLUDED="$LIBRARY/service/resolver/cri.go"
CACHE="${ACCELD_GO_CACHE:-/var/cache/acceld/go-build}"

log() { printf '[stargz-peer] %s\n' "$*"; }

command -v go >/dev/null || { echo "go not found: apt-get install golang-go" >&2; exit 1; }
[[ -f "$LIBRARY/service/service.go" ]] || {
  echo "stargz-snapshotter sources not found under $LIBRARY:" \
    "apt-get install golang-github-containerd-stargz-snapshotter-dev" >&2
  exit 1
}

# What the binary is made of: our sources, the Go toolchain and the library's version.
stamp_of_inputs() {
  {
    cat "$HERE/main.go" "$HERE/build.sh"
    go version
    dpkg-query -W -f='${Version}\n' golang-github-containerd-stargz-snapshotter-dev \
      golang-github-containerd-containerd-dev 2>/dev/null || true
  } | sha256sum | cut -d' ' -f1
}

want="$(stamp_of_inputs)"
if [[ -x "$OUTPUT" && -f "$OUTPUT.stamp" && "$(cat "$OUTPUT.stamp")" == "$want" ]]; then
  log "up to date: $OUTPUT"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
overlay="$work/overlay.json"
if [[ -f "$EXCLUDED" ]]; then
  printf '{"Replace": {"%s": ""}}\n' "$EXCLUDED" >"$overlay"
else
  echo '{"Replace": {}}' >"$overlay"
fi

log "building $OUTPUT"
started=$SECONDS
mkdir -p "$CACHE" "$(dirname "$OUTPUT")"
(
  cd "$HERE"
  GO111MODULE=off GOPATH="$GOCODE" GOCACHE="$CACHE" GOFLAGS= GOPROXY=off CGO_ENABLED=0 \
    go build -overlay "$overlay" -trimpath -ldflags '-s -w' -o "$work/containerd-stargz-grpc" main.go
)
install -m 0755 "$work/containerd-stargz-grpc" "$OUTPUT"
echo "$want" >"$OUTPUT.stamp"
log "built $OUTPUT in $((SECONDS - started)) s"
