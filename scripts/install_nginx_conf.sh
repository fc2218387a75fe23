#!/usr/bin/env bash
# Generate the per-GPU Nginx config for N GPUs and install it (default into /etc/nginx/conf.d/),
# then check it with `nginx -t` and, with --reload, reload Nginx. Other options go to the generator
# (python -m comfy_multigpu.tools.nginx_conf --help): --upstream, --first-port, --auth-file, --allow, ...
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT

usage() {
  cat <<'USAGE'
Usage: scripts/install_nginx_conf.sh [--dest FILE] [--reload] [generator options, e.g. --gpus 4]
  --dest FILE   where to write (default /etc/nginx/conf.d/comfyui-multi-gpu.conf)
  --reload      run `nginx -s reload` after a successful `nginx -t`
The GPU count defaults to COMFY_NUM_GPUS, else 4.
USAGE
}

main() {
  local dest="/etc/nginx/conf.d/comfyui-multi-gpu.conf" reload=0
  local -a gen=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --dest) dest="$2"; shift 2 ;;
      --reload) reload=1; shift ;;
      *) gen+=("$1"); shift ;;
    esac
  done
  if [[ " ${gen[*]:-} " != *" --gpus "* ]]; then
    gen+=(--gpus "${COMFY_NUM_GPUS:-4}")
  fi
  local tmp
  tmp="$(mktemp)"
  PYTHONPATH="${ROOT}" python3 -m comfy_multigpu.tools.nginx_conf "${gen[@]}" > "${tmp}"
  install -m 0644 "${tmp}" "${dest}"
  rm -f "${tmp}"
  echo "wrote ${dest}" >&2
  if [[ "${dest}" == /etc/nginx/* ]]; then
    nginx -t
    if [[ "${reload}" == 1 ]]; then
      nginx -s reload
    fi
  fi
}

main "$@"
