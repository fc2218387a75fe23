#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: prepares the pinned ComfyUI, the cached virtualenv
# (with test requirements) and the extension link, then runs pytest. Arguments go to pytest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
# shellcheck source=scripts/lib/managed_env.sh
source "${ROOT}/scripts/lib/managed_env.sh"

main() {
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    echo "Usage: scripts/run_tests.sh [pytest arguments]   (prepares everything on the first run)"
    exit 0
  fi
  prepare_env --with-tests
  cd "${ROOT}"
  exec "${VENV_PYTHON}" -m pytest "$@"
}

main "$@"
