#!/usr/bin/env bash
# Every check that needs CUDA, in one run of under 8 minutes on one GPU (issues 14 and 17): worker
# device binding, per-device freeing, pinned host memory shared by views, RAM -> VRAM against a plain
# host-to-device copy, the host ceiling with real kernel launches, the quick end-to-end test, process
# workers, sequence parallelism (N rank threads on one GPU: fp32 and bf16 equivalence, FLUX.1-dev's
# forward timed, VAE tiles spread). Prints a markdown table; exit 1 if a check failed, 2 without CUDA.
# --dry-run runs the same code paths on the CPU (CUDA-only checks skipped), as CI does. The logic is in
# bench/gpu_check.py.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
# shellcheck source=scripts/lib/managed_env.sh
source "${ROOT}/scripts/lib/managed_env.sh"

main() {
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    echo "Usage: scripts/gpu_check.sh [--dry-run] [--out FILE] [--budget SECONDS] [--only CHECKS] [--write]" >&2
    echo "  (bench/gpu_check.py --help says more)" >&2
    exit 0
  fi
  prepare_env --no-link     # its servers link the extension into their own base directories
  cd "${ROOT}"
  exec "${VENV_PYTHON}" bench/gpu_check.py "$@"
}

main "$@"
