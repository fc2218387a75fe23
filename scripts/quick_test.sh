#!/usr/bin/env bash
# Check a running comfy-multigpu server end to end: every worker up, one prompt per GPU completes on
# that GPU, /queue/all consistent. Prints a short report; exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT

main() {
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    echo "Usage: scripts/quick_test.sh [URL]   (default http://127.0.0.1:\${PORT:-8188})"
    exit 0
  fi
  local url="${1:-http://127.0.0.1:${PORT:-8188}}"
  PYTHONPATH="${ROOT}" exec python3 -m comfy_multigpu.tools.quick_check --url "${url}"
}

main "$@"
