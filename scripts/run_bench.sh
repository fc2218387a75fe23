#!/usr/bin/env bash
# Run a benchmark script from bench/ in the managed environment (same set-up as the tests).
# Usage: scripts/run_bench.sh bench/bench_orchestration.py [--write]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
# shellcheck source=scripts/lib/managed_env.sh
source "${ROOT}/scripts/lib/managed_env.sh"

main() {
  if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    echo "Usage: scripts/run_bench.sh bench/<script>.py [script arguments]" >&2
    exit 2
  fi
  prepare_env --with-tests
  cd "${ROOT}"
  exec "${VENV_PYTHON}" "$@"
}

main "$@"
