#!/usr/bin/env bash
# Stop the ComfyUI server that scripts/start_multi_gpu.sh started on $PORT (or on the given ports, or
# every one with --all), by its pid file. A pid is signalled only when it is still that ComfyUI
# (main.py with the pid file's --port); a stale pid file is removed and nothing is signalled.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: scripts/stop_multi_gpu.sh [PORT ...]   stop the servers of these ports (default: $PORT, else 8188)
       scripts/stop_multi_gpu.sh --all        stop every server with a pid file
  PORT  the port given to scripts/start_multi_gpu.sh (default 8188)
  STOP_TIMEOUT  seconds to wait after SIGTERM before SIGKILL (default 60)
  COMFY_MULTIGPU_CACHE  cache directory holding run/comfyui-<port>.pid (default ~/.cache/comfy-multigpu)
USAGE
}

# The pid runs what start_multi_gpu.sh exec'd: "<python> main.py ... --port <port> ...".
is_our_comfyui() {
  local pid="$1" port="$2" i
  local -a argv=()
  [[ -r "/proc/${pid}/cmdline" ]] || return 1
  mapfile -d '' -t argv < "/proc/${pid}/cmdline" 2>/dev/null || return 1
  [[ ${#argv[@]} -ge 2 && ( "${argv[1]}" == "main.py" || "${argv[1]}" == */main.py ) ]] || return 1
  for ((i = 2; i + 1 < ${#argv[@]}; i++)); do
    [[ "${argv[i]}" == "--port" && "${argv[i + 1]}" == "${port}" ]] && return 0
  done
  return 1
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
  pid="$(head -n 1 "${file}")"
  if [[ ! "${pid}" =~ ^[0-9]+$ ]] || ! is_our_comfyui "${pid}" "${port}"; then
    echo "port ${port}: pid ${pid} is not our ComfyUI (stale pid file removed, nothing signalled)" >&2
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
  local timeout="${STOP_TIMEOUT:-60}" file port
  local -a files=()
  if [[ "${1:-}" == "--all" ]]; then
    shopt -s nullglob
    files=("${run_dir}"/comfyui-*.pid)
    if [[ ${#files[@]} -eq 0 ]]; then
      echo "no pid files in ${run_dir}" >&2
      exit 0
    fi
  else
    [[ $# -gt 0 ]] || set -- "${PORT:-8188}"
    for port in "$@"; do
      if [[ ! "${port}" =~ ^[0-9]+$ ]]; then
        echo "stop_multi_gpu.sh: '${port}' is not a port number (expected e.g. 8188, or --all)" >&2
        usage >&2
        exit 2
      fi
      files+=("${run_dir}/comfyui-${port}.pid")
    done
  fi
  for file in "${files[@]}"; do
    if [[ -f "${file}" ]]; then
      stop_one "${file}" "${timeout}"
    else
      echo "no pid file ${file} (no server started by scripts/start_multi_gpu.sh on that port)" >&2
    fi
  done
}

main "$@"
