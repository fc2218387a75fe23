#!/usr/bin/env bash
# Run a benchmark script from bench/ in the managed environment (same set-up as the tests).
# Usage: scripts/run_bench.sh bench/bench_orchestration.py [--write]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT

main() {
  if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    echo "Usage: scripts/run_bench.sh bench/<script>.py [script arguments]" >&2
    exit 2
  fi
  local setup
  setup="$(python3 "${ROOT}/scripts/bootstrap.py" --with-tests)"
  eval "${setup}"
  export COMFYUI_DIR COMFY_MULTIGPU_CACHE="${CACHE_DIR}"
  cd "${ROOT}"
  exec "${VENV_PYTHON}" "$@"
}

main "$@"
