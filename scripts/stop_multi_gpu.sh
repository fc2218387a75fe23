#!/usr/bin/env bash
# Stop ComfyUI servers started by scripts/start_multi_gpu.sh, by their pid files. A pid is signalled
# only when it is still that ComfyUI (main.py with the pid file's --port); stale files are removed.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/stop_multi_gpu.sh [PORT ...]      (default: every server with a pid file)
  STOP_TIMEOUT  seconds to wait after SIGTERM before SIGKILL (default 60)
  COMFY_MULTIGPU_CACHE  cache directory holding run/comfyui-<port>.pid (default ~/.cache/comfy-multigpu)
USAGE
}

is_our_comfyui() {
  local pid="$1" port="$2" cmdline
  [[ -r "/proc/${pid}/cmdline" ]] || return 1
  cmdline="$(tr '\0' ' ' < "/proc/${pid}/cmdline")"
  [[ "${cmdline}" == *"main.py"* && "${cmdline}" == *"--port ${port} "* ]]
}

# Running (a zombie, exited but not yet reaped by its parent, counts as gone).
is_alive() {
  local pid="$1" state
  kill -0 "${pid}" 2>/dev/null || return 1
  state="$(awk '{print $3}' "/proc/${pid}/stat" 2>/dev/null || true)"
  [[ -n "${state}" && "${state}" != "Z" ]]
}

stop_one() {
  local file="$1" timeout="$2" port pid waited=0
  port="$(basename "${file}" .pid)"
  port="${port#comfyui-}"
  pid="$(cat "${file}")"
  if ! is_our_comfyui "${pid}" "${port}"; then
    echo "port ${port}: pid ${pid} is not our ComfyUI (stale pid file removed)" >&2
    rm -f "${file}"
    return 0
  fi
  kill -TERM "${pid}"
  while is_alive "${pid}" && (( waited < timeout * 10 )); do
    sleep 0.1
    waited=$((waited + 1))
  done
  if is_alive "${pid}"; then
    echo "port ${port}: pid ${pid} still running after ${timeout} s; sending SIGKILL" >&2
    kill -KILL "${pid}"
  fi
  rm -f "${file}"
  echo "port ${port}: stopped pid ${pid}"
}

main() {
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
  fi
  local run_dir="${COMFY_MULTIGPU_CACHE:-${XDG_CACHE_HOME:-${HOME}/.cache}/comfy-multigpu}/run"
  local timeout="${STOP_TIMEOUT:-60}" file
  local -a files=()
  if [[ $# -gt 0 ]]; then
    for port in "$@"; do
      files+=("${run_dir}/comfyui-${port}.pid")
    done
  else
    shopt -s nullglob
    files=("${run_dir}"/comfyui-*.pid)
  fi
  if [[ ${#files[@]} -eq 0 ]]; then
    echo "no pid files in ${run_dir}" >&2
    exit 0
  fi
  for file in "${files[@]}"; do
    if [[ -f "${file}" ]]; then
      stop_one "${file}" "${timeout}"
    else
      echo "no pid file ${file}" >&2
    fi
  done
}

main "$@"
