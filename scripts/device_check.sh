#!/usr/bin/env bash
# The GPU check on a lent GPU machine that reaches no network: unpacks .device/ (made here by
# scripts/device_kit.py, carried by the device tool) into a temporary directory and runs
# bench/gpu_check.py with the machine's own python3 (torch and most of ComfyUI's requirements are
# there). Arguments go to gpu_check.py (e.g. --only sp --budget 300). The table goes to
# $OUT/gpu_check.md and the checks' logs to $OUT/gpu_check_logs.tgz when $OUT is set (the device tool
# brings them back). docs/development.md, "GPU check on a lent machine".
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly KIT="${ROOT}/.device"

main() {
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    echo "Usage: scripts/device_check.sh [gpu_check.py's options, e.g. --only sp --budget 300]" >&2
    echo "  on a lent GPU machine, with .device/ carried (python3 scripts/device_kit.py makes it)" >&2
    exit 0
  fi
  if [[ ! -f "${KIT}/comfyui.tgz" || ! -f "${KIT}/site.tgz" ]]; then
    echo "device_check: no kit in ${KIT}: run python3 scripts/device_kit.py on the machine you work on," \
         "and name .device in the device tool's carry" >&2
    exit 2
  fi
  local work="${TMPDIR:-/tmp}/comfy-multigpu-device"
  local out="${OUT:-${work}}"
  rm -rf "${work}" && mkdir -p "${work}/site" "${out}"
  tar xzf "${KIT}/comfyui.tgz" -C "${work}" && tar xzf "${KIT}/site.tgz" -C "${work}/site" || exit 2
  export PYTHONPATH="${work}/site${PYTHONPATH:+:${PYTHONPATH}}" COMFYUI_DIR="${work}/comfyui"
  export COMFY_MULTIGPU_CACHE="${work}/cache" PYTHONUNBUFFERED=1
  cd "${ROOT}" || exit 2
  # Seconds, not a machine start, if the machine lacks something the checks import.
  python3 -c "import torch, psutil, einops, safetensors, transformers, yaml, PIL, comfy_aimdo, comfy_kitchen" || {
    echo "device_check: this machine's python3 lacks a package above: add its cp312 wheel to scripts/device_kit.py" >&2
    exit 2
  }
  python3 bench/gpu_check.py --out "${out}/gpu_check.md" "$@"
  local rc=$?
  if [[ -d "${work}/cache/gpu-check" && "${out}" != "${work}" ]]; then
    tar czf "${out}/gpu_check_logs.tgz" -C "${work}/cache" gpu-check
  fi
  exit "${rc}"
}

main "$@"
