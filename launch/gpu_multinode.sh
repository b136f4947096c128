#!/usr/bin/env bash
# Trains on GPUs without a cluster manager: one host with all its GPUs, or one process per host
# of a plain multi-node run with an explicit coordinator (run it on every host, same flags but
# --process-id).
#
#   launch/gpu_multinode.sh --workdir=DIR [--config=configs/imagenet.py] [--gpus=0,1,...]
#       [--coordinator=HOST:PORT --num-processes=N --process-id=I] [--tfds-data-dir=DIR]
#       [--venv=.venv] [--dry-run] [-- --config.FIELD=VALUE ...]
#
# One host: every visible GPU (or those of --gpus) joins one ('data',) mesh. Several hosts:
# process I of N joins the coordinator (process 0's host and a free port on it, reachable from
# every host) through jax.distributed; --workdir must be shared by all hosts (gs:// or a shared
# file system). The training replaces this script, so SIGTERM reaches it: it saves a checkpoint
# and exits 0, and the same command resumes from it. Set up the venv first with
# `bash launch/setup_venv.sh --accelerator=cuda12`. --dry-run prints the command instead.
set -euo pipefail

ROOT=$(cd "${BASH_SOURCE[0]%/*}/.." && pwd)
# shellcheck source=launch/common.sh
source "${ROOT}/launch/common.sh"

CONFIG=configs/imagenet.py
WORKDIR=""
GPUS=""
COORDINATOR=""
NUM_PROCESSES=""
PROCESS_ID=""
DATA_DIR=""
VENV=.venv
DRY_RUN=${DRY_RUN:-0}
EXTRA_ARGS=()  # Flags after `--`, passed on to the trainer.
TAKES_TRAINER_ARGS=1

set_option() {
  [[ -n "$2" ]] || die "$1 needs a value (see launch/gpu_multinode.sh --help)"
  case "$1" in
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --gpus) GPUS=$2 ;;
    --coordinator) COORDINATOR=$2 ;;
    --num-processes) NUM_PROCESSES=$2 ;;
    --process-id) PROCESS_ID=$2 ;;
    --tfds-data-dir) DATA_DIR=$2 ;;
    --venv) VENV=$2 ;;
    *) die "unknown option $1 (see launch/gpu_multinode.sh --help)" ;;
  esac
}

parse_args() {
  parse_command_line "${BASH_SOURCE[0]}" "$@"
}

validate() {
  [[ -n "${WORKDIR}" ]] || die "no workdir given: pass --workdir=DIR (gs:// or shared by all hosts)"
  [[ -z "${GPUS}" || "${GPUS}" =~ ^[0-9]+(,[0-9]+)*$ ]] ||
    die "--gpus=${GPUS} is not a list of GPU indices: pass e.g. --gpus=0,1,2,3"
  local given=0
  [[ -n "${COORDINATOR}" ]] && given=$(( given + 1 ))
  [[ -n "${NUM_PROCESSES}" ]] && given=$(( given + 1 ))
  [[ -n "${PROCESS_ID}" ]] && given=$(( given + 1 ))
  (( given == 0 || given == 3 )) ||
    die "a multi-node run needs all of --coordinator=HOST:PORT --num-processes=N --process-id=I"
  (( given == 3 )) || return 0
  [[ "${COORDINATOR}" =~ ^[^:[:space:]]+:[0-9]+$ ]] ||
    die "--coordinator=${COORDINATOR} is not HOST:PORT: pass process 0's host and a free port"
  [[ "${NUM_PROCESSES}" =~ ^[1-9][0-9]*$ ]] ||
    die "--num-processes=${NUM_PROCESSES} is not a positive number of processes"
  if [[ ! "${PROCESS_ID}" =~ ^[0-9]+$ ]] || (( PROCESS_ID >= NUM_PROCESSES )); then
    die "--process-id=${PROCESS_ID} is not in 0..$(( NUM_PROCESSES - 1 )): number the hosts from 0"
  fi
}

main() {
  parse_args "$@"
  validate
  cd "${ROOT}"
  local env_vars=() command=()
  [[ -z "${GPUS}" ]] || env_vars+=("CUDA_VISIBLE_DEVICES=${GPUS}")
  [[ -z "${DATA_DIR}" ]] || env_vars+=("TFDS_DATA_DIR=${DATA_DIR}")
  (( ${#env_vars[@]} == 0 )) || command=(env "${env_vars[@]}")
  command+=("${VENV}/bin/python" -m sagan_jax.main "--config=${CONFIG}" "--workdir=${WORKDIR}")
  if [[ -n "${COORDINATOR}" ]]; then
    command+=("--coordinator_address=${COORDINATOR}" "--num_processes=${NUM_PROCESSES}"
              "--process_id=${PROCESS_ID}")
  fi
  command+=("${EXTRA_ARGS[@]}")
  (( DRY_RUN )) || [[ -x "${VENV}/bin/python" ]] ||
    die "${VENV}/bin/python not found: run bash launch/setup_venv.sh --accelerator=cuda12 first"
  run_exec "${command[@]}"
}

main "$@"
