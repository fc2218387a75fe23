# shellcheck shell=bash
# Sourced by the scripts that run Python in the managed environment: prepare_env runs
# scripts/bootstrap.py (pinned ComfyUI, cached virtualenv, extension link) with the given options and
# exports COMFYUI_DIR, VENV_PYTHON, CACHE_DIR and COMFY_MULTIGPU_CACHE. Expects ROOT to be set.

prepare_env() {
  local setup
  setup="$(python3 "${ROOT}/scripts/bootstrap.py" "$@")"
  eval "${setup}"
  export COMFYUI_DIR VENV_PYTHON CACHE_DIR COMFY_MULTIGPU_CACHE="${CACHE_DIR}"
}
