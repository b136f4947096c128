#!/usr/bin/env bash
# Creates the project's .venv on this machine with the accelerator build of jax: a TPU VM worker
# (launch/tpu_vm.sh setup runs it on every worker), a GPU host or a CPU machine.
#
#   bash launch/setup_venv.sh --accelerator=tpu|cuda12|cuda13|cpu [--python=PYTHON]
#                             [--venv=.venv] [--dry-run]
#
# Python 3.11 or newer is needed (jax); without one, python3.11 and python3.11-venv are installed
# with apt-get (Ubuntu 22.04 TPU VM images have 3.10). jax[ACCELERATOR] is pinned to the jax
# version of requirements.txt and installed in the same pip call as the requirements, so nothing
# replaces it; requirements.txt pins only the top-level packages, so their own dependencies come
# in too. The project goes in with --no-deps (editable). --dry-run prints the commands instead.
set -euo pipefail

ROOT=$(cd "${BASH_SOURCE[0]%/*}/.." && pwd)
# shellcheck source=launch/common.sh
source "${ROOT}/launch/common.sh"

ACCELERATOR=""
PYTHON=""
VENV=.venv
DRY_RUN=${DRY_RUN:-0}

set_option() {
  [[ -n "$2" ]] || die "$1 needs a value (see launch/setup_venv.sh --help)"
  case "$1" in
    --accelerator) ACCELERATOR=$2 ;;
    --python) PYTHON=$2 ;;
    --venv) VENV=$2 ;;
    *) die "unknown option $1 (see launch/setup_venv.sh --help)" ;;
  esac
}

parse_args() {
  parse_command_line "${BASH_SOURCE[0]}" "$@"
  case "${ACCELERATOR}" in
    tpu|cuda12|cuda13|cpu) ;;
    '') die "no accelerator given: pass --accelerator=tpu, cuda12, cuda13 or cpu" ;;
    *) die "unknown accelerator '${ACCELERATOR}': use --accelerator=tpu, cuda12, cuda13 or cpu" ;;
  esac
}

# True for an interpreter that is Python 3.11 or newer and can create venvs.
usable_python() {
  "$1" -c 'import ensurepip, sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

# Picks PYTHON (the given one, else python3 or the newest python3.1x), installing it if needed.
choose_python() {
  local candidate
  if [[ -z "${PYTHON}" ]]; then
    PYTHON=python3.11  # What apt-get installs below when nothing usable is found.
    for candidate in python3 python3.13 python3.12 python3.11; do
      if usable_python "${candidate}"; then
        PYTHON=${candidate}
        break
      fi
    done
  fi
  usable_python "${PYTHON}" && return 0
  command -v apt-get >/dev/null ||
    die "${PYTHON} is not a Python 3.11+ with venv: install one and pass --python=PATH"
  local name=${PYTHON##*/} sudo=()
  [[ "$(id -u)" == 0 ]] || sudo=(sudo)
  # TPU VMs run unattended upgrades after boot: wait for the package lock instead of failing.
  run "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=600 update -q
  run "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=600 install -y -q "${name}" "${name}-venv"
}

main() {
  parse_args "$@"
  cd "${ROOT}"
  local jax_version requirements=(-r requirements.txt)
  jax_version=$(pinned_jax_version requirements.txt) ||
    fail "requirements.txt has no jax==VERSION line to pin the accelerator build to"
  [[ "${ACCELERATOR}" == cpu ]] || requirements+=("jax[${ACCELERATOR}]==${jax_version}")
  choose_python
  [[ -x "${VENV}/bin/python" ]] || run "${PYTHON}" -m venv "${VENV}"
  run "${VENV}/bin/python" -m pip install -q --upgrade pip
  run "${VENV}/bin/python" -m pip install -q "${requirements[@]}"
  run "${VENV}/bin/python" -m pip install -q --no-deps -e .
  run "${VENV}/bin/python" -c \
    'import flax, jax, optax, orbax.checkpoint, tensorflow_datasets; print("jax", jax.__version__)'
}

main "$@"
