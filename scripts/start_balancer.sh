#!/usr/bin/env bash
# Start the queue-aware balancer across ComfyUI instances in the foreground, from the same managed
# environment as scripts/start_multi_gpu.sh. Arguments go to `python -m comfy_multigpu.balancer`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
# shellcheck source=scripts/lib/managed_env.sh
source "${ROOT}/scripts/lib/managed_env.sh"

usage() {
  cat <<'USAGE'
Usage: scripts/start_balancer.sh --backend URL[=weight] [--backend ...] [--listen HOST:PORT]
                                 [--poll-interval SECONDS] [--config FILE] [--token TOKEN]

Environment (used when the flag is absent): COMFY_BALANCER_BACKENDS ("URL[=weight],URL"),
COMFY_BALANCER_LISTEN (127.0.0.1:9999), COMFY_BALANCER_POLL_INTERVAL (0.5),
COMFY_BALANCER_TOKEN, COMFY_BALANCER_CONFIG. See docs/balancer.md.
USAGE
}

main() {
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
  fi
  # shellcheck disable=SC2119  # no bootstrap options: the defaults
  prepare_env
  cd "${ROOT}"
  exec "${VENV_PYTHON}" -m comfy_multigpu.balancer "$@"
}

main "$@"
