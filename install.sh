#!/usr/bin/env bash
# Installs everything acceld needs on a fresh Debian 12 machine, unattended, as root.
# Idempotent: each step checks what is already there, so a second run takes seconds.
#
#   ./install.sh               acceld and everything its tests and benchmarks need
#   ./install.sh --bench-peer  also the peer the startup benchmark compares against:
#                              stargz-snapshotter's daemon, built from Debian's Go
#                              packages (same as ACCELD_BENCH_PEER=1)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${ACCELD_VENV:-$ROOT/.venv}"
PYTHON="${ACCELD_PYTHON:-python3}"
BENCH_PEER="${ACCELD_BENCH_PEER:-0}"
STARGZ_GRPC="${ACCELD_STARGZ_GRPC:-/usr/local/libexec/acceld/containerd-stargz-grpc}"

for arg in "$@"; do
  case "$arg" in
    --bench-peer) BENCH_PEER=1 ;;
    *) echo "usage: $0 [--bench-peer]" >&2; exit 2 ;;
  esac
done

APT_PACKAGES=(
  containerd runc pigz docker-registry fuse3 libfuse3-dev pkg-config python3-bpfcc
  skopeo umoci iproute2 stargz-snapshotter apache2-utils ca-certificates busybox-static linux-libc-dev debootstrap systemd
  tinyproxy-bin
)
# Only for --bench-peer: the Go toolchain and stargz-snapshotter's library sources.
BENCH_PEER_APT_PACKAGES=(golang-go golang-github-containerd-stargz-snapshotter-dev)

log() { printf '[install] %s\n' "$*"; }

install_apt_packages() {
  local missing=()
  for pkg in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$pkg")
    fi
  done
  if ((${#missing[@]} == 0)); then
    log "apt packages present"
    return
  fi
  log "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
}

install_virtualenv() {
  local stamp="$VENV/.acceld-install-stamp"
  local want
  want="$(cat "$ROOT/pyproject.toml" "$ROOT/install.sh" | sha256sum | cut -d' ' -f1)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    log "virtualenv up to date ($VENV)"
    return
  fi
  log "building virtualenv in $VENV"
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
  "$VENV/bin/pip" install -q -e "$ROOT[dev,bench]"
  echo "$want" >"$stamp"
}

# Debian's bcc is pure Python over libbcc; link just that package into the venv so the
# rest of /usr/lib/python3/dist-packages stays out of it.
link_bcc() {
  local site
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  if [[ ! -e "$site/bcc" ]]; then
    ln -s /usr/lib/python3/dist-packages/bcc "$site/bcc"
  fi
  "$VENV/bin/python" -c 'import bcc' && log "bcc importable from the virtualenv"
}

# Debian ships stargz-snapshotter's library and ctr-remote but not its daemon: build our
# own short main (packaging/stargz-peer) to $STARGZ_GRPC; the benchmark looks there.
install_bench_peer() {
  install_apt_packages "${BENCH_PEER_APT_PACKAGES[@]}"
  "$ROOT/packaging/stargz-peer/build.sh" "$STARGZ_GRPC"
}

install_apt_packages "${APT_PACKAGES[@]}"
install_virtualenv
link_bcc
if [[ "$BENCH_PEER" == 1 ]]; then
  install_bench_peer
fi
log "done"
