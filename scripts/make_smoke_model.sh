#!/usr/bin/env bash
# Put a smoke-test checkpoint where ComfyUI finds it: a tiny SD1.5-shaped model with RANDOM weights
# (tests/fixtures/make_tiny_checkpoint.py, fixed seed), so a fresh machine can run a txt2img end to end.
# Its images are noise. Written once; run again, it says the file is already there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly NAME="smoke-test-random-sd15.safetensors"
# shellcheck source=scripts/lib/managed_env.sh
source "${ROOT}/scripts/lib/managed_env.sh"

usage() {
  cat <<USAGE
Usage: scripts/make_smoke_model.sh [CHECKPOINTS_DIR]

Writes ${NAME} (about 430 MiB, random weights: a smoke test, its images are noise)
into CHECKPOINTS_DIR, by default the models/checkpoints folder of the ComfyUI that
scripts/start_multi_gpu.sh runs (COMFYUI_DIR, else the pinned one in the cache).
USAGE
}

main() {
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
  fi
  prepare_env --no-link
  local dest="${1:-${COMFYUI_DIR}/models/checkpoints}"
  local target="${dest}/${NAME}"
  if [[ -f "${target}" ]]; then
    echo "${target} is already there (smoke-test model, random weights: its images are noise)"
    return 0
  fi
  mkdir -p "${dest}"
  local tmp
  tmp="$(mktemp -d "${CACHE_DIR}/smoke-model.XXXXXX")"
  # shellcheck disable=SC2064  # expand now: tmp is local to main
  trap "rm -rf '${tmp}'" EXIT
  "${VENV_PYTHON}" "${ROOT}/tests/fixtures/make_tiny_checkpoint.py" "${COMFYUI_DIR}" "${tmp}" >/dev/null
  mv "${tmp}/tiny-sd15.safetensors" "${target}.part"
  mv "${target}.part" "${target}"
  echo "wrote ${target}"
  echo "  a SMOKE-TEST model: SD1.5-shaped with RANDOM weights; every image it makes is noise."
  echo "  use it as ckpt_name \"${NAME}\""
  if [[ $# -eq 0 ]]; then
    echo "  images this ComfyUI saves go to ${COMFYUI_DIR}/output/"
  fi
}

main "$@"
