#!/usr/bin/env bash
# The two entry points of the README: `./run.sh demo` and `./run.sh test`.
# Each first runs the (idempotent) installer, so either works on a fresh machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$ROOT/install.sh"
VENV="${ACCELD_VENV:-$ROOT/.venv}"
cmd="${1:-}"
shift || true
case "$cmd" in
  demo) exec "$VENV/bin/accelctl" demo "$@" ;;
  test) cd "$ROOT" && exec "$VENV/bin/pytest" "$@" ;;
  *) echo "usage: $0 demo|test [args...]" >&2; exit 2 ;;
esac
