#!/usr/bin/env bash
# Exercise every stock endpoint through every per-GPU port (Nginx in front of comfy-multigpu) and
# print a table: POST /prompt, GET/POST /queue, POST /interrupt, GET /history, POST /upload/image,
# POST /upload/mask, GET /view, /ws. Safe on a live server. Exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
# shellcheck source=scripts/lib/managed_env.sh
source "${ROOT}/scripts/lib/managed_env.sh"

usage() {
  cat <<'USAGE'
Usage: scripts/test_multi_gpu_endpoints.sh [--host H] [--first-port 8181] [--gpus 4] [--auto-port 8180]
Port first-port+i must reach GPU i (the Nginx config from nginx/ or scripts/install_nginx_conf.sh).
USAGE
}

main() {
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
  fi
  prepare_env --no-link
  cd "${ROOT}"
  exec "${VENV_PYTHON}" -m comfy_multigpu.tools.endpoint_check "$@"
}

main "$@"
