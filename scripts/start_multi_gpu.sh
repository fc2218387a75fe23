#!/usr/bin/env bash
# Start ComfyUI with comfy-multigpu in the foreground: one queue and one worker per GPU.
# First run prepares everything (scripts/bootstrap.py): the pinned ComfyUI, a cached virtualenv,
# the extension linked into custom_nodes/. Extra arguments go to ComfyUI's main.py.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
# shellcheck source=scripts/lib/managed_env.sh
source "${ROOT}/scripts/lib/managed_env.sh"

usage() {
  cat <<'USAGE'
Usage: scripts/start_multi_gpu.sh [ComfyUI main.py arguments...]

Environment:
  PORT (8188)  LISTEN (127.0.0.1)  COMFY_NUM_GPUS  COMFY_MULTIGPU_DEVICES  COMFY_MULTI_GPU_SCHED
  CUDA_VISIBLE_DEVICES  COMFYUI_DIR (existing checkout)  COMFYUI_REPO (clone source)
  COMFY_MULTIGPU_CACHE (cache directory, default ~/.cache/comfy-multigpu)
Without a visible CUDA device ComfyUI is started with --cpu and the workers run on the CPU.
USAGE
}

main() {
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
  fi
  # shellcheck disable=SC2119  # no bootstrap options: the defaults (link the extension, no test extras)
  prepare_env
  local -a extra=()
  local cuda
  cuda="$(PYTHONPATH="${ROOT}" python3 -c \
    'from comfy_multigpu.policy.config import cuda_count_without_torch as c; print(c())')"
  if [[ "${cuda}" == "0" && " $* " != *" --cpu "* ]]; then
    echo "comfy-multigpu: no CUDA device visible; starting ComfyUI with --cpu" >&2
    extra+=(--cpu)
  fi
  local port="${PORT:-8188}"
  local run_dir="${CACHE_DIR}/run"
  mkdir -p "${run_dir}"
  echo "$$" > "${run_dir}/comfyui-${port}.pid"
  cd "${COMFYUI_DIR}"
  exec "${VENV_PYTHON}" main.py --listen "${LISTEN:-127.0.0.1}" --port "${port}" "${extra[@]}" "$@"
}

main "$@"
