#!/usr/bin/env bash
# Cloud TPU VMs: create a slice, set up every worker, train on all of them, follow the logs, stop
# (SIGTERM: training saves a checkpoint and exits), delete, and resume after a spot preemption.
#
#   launch/tpu_vm.sh COMMAND --zone=ZONE [--name=sagan] [--project=PROJECT] [options] [-- FLAGS]
#
# Commands:
#   create   a TPU VM (or with --queued a queued resource) of --accelerator-type: v4-N, v5p-N,
#            v5litepod-N (v5e) or v6e-N; --spot for spot capacity; --runtime-version overrides
#            the type's default (v4: tpu-ubuntu2204-base, v5e: v2-alpha-tpuv5-lite,
#            v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
#   setup    on every worker: this checkout copied with `gcloud compute tpus tpu-vm scp` (or with
#            --repo=URL [--ref=REF] fetched by git) to ~/sagan_jax, then launch/setup_venv.sh
#   train    on every worker, in the background: python -m sagan_jax.main
#            --config=CONFIG --workdir=WORKDIR [FLAGS after --], one log per worker in
#            ~/sagan_jax/logs/train_worker<N>.log; needs --workdir (gs:// on multi-host slices)
#            and --accelerator-type; --tfds-data-dir=gs://... sets TFDS_DATA_DIR
#   logs     follow worker --worker's log (default 0; 'all' for every worker)
#   status   the slice's state and whether each worker is training
#   stop     SIGTERM to the training process on every worker; waits until it has saved
#   delete   the TPU VM (or queued resource) and its disks
#   resume   after a preemption: delete the preempted slice if needed, create, setup, train
#            (takes the options of create, setup and train); training resumes from the newest
#            checkpoint in --workdir
#   exec     run FLAGS after -- as a command in ~/sagan_jax with the venv, on --worker (all)
#
# Options: --config (configs/imagenet.py), --python (for setup_venv), --dry-run (print the
# gcloud commands, one per line, instead of running them).

# Remote commands are single-quoted on purpose: they expand on the workers, not here.
# shellcheck disable=SC2016
set -euo pipefail

ROOT=$(cd "${BASH_SOURCE[0]%/*}/.." && pwd)
# shellcheck source=launch/common.sh
source "${ROOT}/launch/common.sh"

COMMAND=""
NAME=sagan
ZONE=""
PROJECT=""
ACCELERATOR_TYPE=""
RUNTIME_VERSION=""
SPOT=0
QUEUED=0
REPO_URL=""
REF=main
CONFIG=configs/imagenet.py
WORKDIR=""
DATA_DIR=""
WORKER=""
PYTHON=""
DRY_RUN=${DRY_RUN:-0}
EXTRA_ARGS=()  # Flags after `--`, passed on to the trainer.
TAKES_TRAINER_ARGS=1
REMOTE_DIR=sagan_jax  # Relative to the home directory, where ssh commands start.
STOP_TIMEOUT_S=900    # How long `stop` waits for the checkpoint save.
POLL_S=60             # How often to ask about a slice that is not ready yet.
# The worker's index from the TPU metadata server (the hostname where that is not reachable).
METADATA=http://metadata.google.internal/computeMetadata/v1/instance/attributes
WORKER_ID='w=$(curl -sf -H Metadata-Flavor:Google '"${METADATA}"'/agent-worker-number || hostname)'
RUNNING='[ -f train.pid ] && kill -0 "$(cat train.pid)" 2>/dev/null'

set_option() {
  [[ -n "$2" ]] || die "$1 needs a value (see launch/tpu_vm.sh --help)"
  case "$1" in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator-type) ACCELERATOR_TYPE=$2 ;;
    --runtime-version) RUNTIME_VERSION=$2 ;;
    --repo) REPO_URL=$2 ;;
    --ref) REF=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --tfds-data-dir) DATA_DIR=$2 ;;
    --worker) WORKER=$2 ;;
    --python) PYTHON=$2 ;;
    *) die "unknown option $1 (see launch/tpu_vm.sh --help)" ;;
  esac
}

set_switch() {
  case "$1" in
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    *) return 1 ;;
  esac
}

set_word() {
  [[ -z "${COMMAND}" ]] || die "unexpected argument '$1' (see $2 --help)"
  COMMAND=$1
}

parse_args() {
  parse_command_line "${BASH_SOURCE[0]}" "$@"
}

# Hosts (VMs) of an accelerator type; fails for a type this script does not know.
# v4-N and v5p-N count TensorCores (2 per chip, 4 chips per host); v5litepod-N and v6e-N count
# chips (up to 8 on one host, 4 per host in larger slices).
hosts_of() {
  local family=${1%-*} size=${1##*-}
  [[ "$1" == *-* && "${size}" =~ ^[1-9][0-9]*$ ]] || return 1
  case "${family}" in
    v4|v5p) (( size % 8 == 0 )) && echo $(( size / 8 )) ;;
    v5litepod|v6e)
      case "${size}" in
        1|4|8) echo 1 ;;
        16|32|64|128|256) echo $(( size / 4 )) ;;
        *) return 1 ;;
      esac ;;
    *) return 1 ;;
  esac
}

default_runtime_version() {
  case "${1%-*}" in
    v4) echo tpu-ubuntu2204-base ;;
    v5litepod) echo v2-alpha-tpuv5-lite ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v6e) echo v2-alpha-tpuv6e ;;
  esac
}

check_accelerator_type() {
  [[ -n "${ACCELERATOR_TYPE}" ]] ||
    die "no accelerator type given: pass --accelerator-type=TYPE, e.g. v4-32, v5litepod-16, v6e-8"
  hosts_of "${ACCELERATOR_TYPE}" >/dev/null ||
    die "unknown accelerator type '${ACCELERATOR_TYPE}': use v4-N or v5p-N (N a multiple of 8)," \
      "v5litepod-N or v6e-N (N in 1, 4, 8, 16, ..., 256)"
  RUNTIME_VERSION=${RUNTIME_VERSION:-$(default_runtime_version "${ACCELERATOR_TYPE}")}
}

check_workdir() {
  [[ -n "${WORKDIR}" ]] || die "no workdir given: pass --workdir=gs://BUCKET/DIR"
  local hosts
  hosts=$(hosts_of "${ACCELERATOR_TYPE}")
  if (( hosts > 1 )) && [[ "${WORKDIR}" != gs://* ]]; then
    die "--workdir=${WORKDIR} is not on gs://: the ${hosts} hosts of ${ACCELERATOR_TYPE} must" \
      "share it, so pass --workdir=gs://BUCKET/DIR"
  fi
}

# Everything is checked before the first gcloud call: bad input costs nothing.
validate() {
  case "${COMMAND}" in
    create|setup|train|logs|status|stop|delete|resume|exec) ;;
    '') die "no command given: use create, setup, train, logs, status, stop, delete, resume or exec" ;;
    *) die "unknown command '${COMMAND}': use create, setup, train, logs, status, stop, delete," \
      "resume or exec" ;;
  esac
  [[ -n "${ZONE}" ]] || die "no zone given: pass --zone=ZONE, e.g. --zone=us-central2-b"
  [[ "${NAME}" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name=${NAME} is not a valid TPU name: use lowercase letters, digits and hyphens"
  case "${COMMAND}" in
    create) check_accelerator_type ;;
    train|resume) check_accelerator_type; check_workdir ;;
    exec) (( ${#EXTRA_ARGS[@]} )) || die "exec needs a command after --, e.g. -- python -m ..." ;;
  esac
  if [[ -n "${WORKER}" && ! "${WORKER}" =~ ^(all|[0-9]+)$ ]]; then
    die "--worker=${WORKER} is not a worker: pass a number (0 is the first) or all"
  fi
  (( DRY_RUN )) || require_command gcloud \
    "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), then gcloud auth login"
}

# gcloud compute tpus SUBCOMMAND... with the zone and project of every call.
tpus() {
  run gcloud compute tpus "$@" "--zone=${ZONE}" ${PROJECT:+"--project=${PROJECT}"}
}

# Runs a shell command in ~/sagan_jax on workers $1 (all, or an index).
on_workers() {
  tpus tpu-vm ssh "${NAME}" "--worker=$1" "--command=cd ${REMOTE_DIR} && $2"
}

# The slice's state: READY/ACTIVE, a transition, PREEMPTED/SUSPENDED/FAILED..., or MISSING.
slice_state() {
  local kind=tpu-vm format='value(state)'
  (( QUEUED )) && kind=queued-resources format='value(state.state)'
  if (( DRY_RUN )); then
    command_line gcloud compute tpus "${kind}" describe "${NAME}" "--zone=${ZONE}" \
      ${PROJECT:+"--project=${PROJECT}"} "--format=${format}"
    echo PREEMPTED
    return 0
  fi
  gcloud compute tpus "${kind}" describe "${NAME}" "--zone=${ZONE}" \
    ${PROJECT:+"--project=${PROJECT}"} "--format=${format}" 2>/dev/null || echo MISSING
}

# Waits while the slice is being created or queued; fails when it ends up anywhere but ready.
wait_until_ready() {
  local state
  while true; do
    state=$(slice_state)
    if (( DRY_RUN )); then
      printf '%s\n' "${state%%$'\n'*}"
      return 0
    fi
    case "${state}" in
      READY|ACTIVE) return 0 ;;
      CREATING|STARTING|RESTARTING|REPAIRING|ACCEPTED|PROVISIONING|WAITING_FOR_RESOURCES) ;;
      *) fail "${NAME} is ${state}, not ready: see launch/tpu_vm.sh status, or use resume" ;;
    esac
    echo "${NAME} is ${state}; asking again in ${POLL_S} s" >&2
    sleep "${POLL_S}"
  done
}

cmd_create() {
  local spot=()
  (( SPOT )) && spot=(--spot)
  if (( QUEUED )); then
    tpus queued-resources create "${NAME}" "--node-id=${NAME}" \
      "--accelerator-type=${ACCELERATOR_TYPE}" "--runtime-version=${RUNTIME_VERSION}" "${spot[@]}"
    wait_until_ready  # A queued resource waits for capacity; setup needs the VMs.
  else
    tpus tpu-vm create "${NAME}" "--accelerator-type=${ACCELERATOR_TYPE}" \
      "--version=${RUNTIME_VERSION}" "${spot[@]}"
  fi
}

cmd_setup() {
  local fetch
  if [[ -n "${REPO_URL}" ]]; then
    fetch="{ [ -d ${REMOTE_DIR}/.git ] || git clone -q $(quote "${REPO_URL}") ${REMOTE_DIR}; }"
    fetch+=" && cd ${REMOTE_DIR} && git fetch -q origin $(quote "${REF}")"
    fetch+=" && git checkout -q --force FETCH_HEAD"
  else
    local tarball="${TMPDIR:-/tmp}/sagan_jax-${NAME}.tar.gz"
    run tar -czf "${tarball}" --exclude=.git --exclude=.venv --exclude=runs \
      --exclude=__pycache__ --exclude='*.egg-info' -C "${ROOT}" .
    tpus tpu-vm scp "${tarball}" "${NAME}:sagan_jax.tar.gz" --worker=all
    fetch="mkdir -p ${REMOTE_DIR} && tar -xzf sagan_jax.tar.gz -C ${REMOTE_DIR} && cd ${REMOTE_DIR}"
  fi
  local setup_venv="bash launch/setup_venv.sh --accelerator=tpu"
  [[ -z "${PYTHON}" ]] || setup_venv+=" --python=$(quote "${PYTHON}")"
  tpus tpu-vm ssh "${NAME}" --worker=all "--command=${fetch} && ${setup_venv}"
}

# The remote commands below are one line each (a dry run prints one command per line).
cmd_train() {
  local python log='"logs/train_worker$w.log"' script
  # The compilation cache first: a restart loads the compiled step; `-- --config.compilation_
  # cache_dir=` after it (empty) turns it off.
  python=$(command_line .venv/bin/python -m sagan_jax.main "--config=${CONFIG}" \
    "--workdir=${WORKDIR}" "--config.compilation_cache_dir=${WORKDIR%/}/xla_cache" \
    "${EXTRA_ARGS[@]}")
  script="mkdir -p logs && ${WORKER_ID} && if ${RUNNING}; then"
  script+=' echo "worker $w: already training (pid $(cat train.pid))"; else'
  [[ -z "${DATA_DIR}" ]] || script+=" export TFDS_DATA_DIR=$(quote "${DATA_DIR}");"
  script+=" nohup ${python} >> ${log} 2>&1 < /dev/null & echo \$! > train.pid;"
  script+=" echo \"worker \$w: training, log ~/${REMOTE_DIR}/logs/train_worker\$w.log\"; fi"
  on_workers all "${script}"
}

cmd_logs() {
  on_workers "${WORKER:-0}" 'tail -n 100 -F logs/train_worker*.log'
}

cmd_status() {
  local kind=tpu-vm script
  (( QUEUED )) && kind=queued-resources
  tpus "${kind}" describe "${NAME}"
  script="${WORKER_ID} && if ${RUNNING}; then"
  script+=' echo "worker $w: training (pid $(cat train.pid)):" "$(tail -n 1 logs/train_worker$w.log)";'
  script+=' else echo "worker $w: not training"; fi'
  on_workers all "${script}" || true  # A preempted slice has no workers to ask.
}

# SIGTERM makes training save a checkpoint and exit 0; wait for that on every worker.
cmd_stop() {
  local script="${WORKER_ID} && if ${RUNNING}; then p=\$(cat train.pid); kill -TERM \$p;"
  script+=" for i in \$(seq ${STOP_TIMEOUT_S}); do kill -0 \$p 2>/dev/null || break; sleep 1; done;"
  script+=" if kill -0 \$p 2>/dev/null; then"
  script+=" echo \"worker \$w: still saving after ${STOP_TIMEOUT_S} s\"; exit 1; fi;"
  script+=' echo "worker $w: stopped (checkpoint saved)"; else echo "worker $w: not training"; fi'
  on_workers all "${script}"
}

cmd_delete() {
  if (( QUEUED )); then
    tpus queued-resources delete "${NAME}" --force --quiet
  else
    tpus tpu-vm delete "${NAME}" --quiet
  fi
}

cmd_resume() {
  local state
  (( DRY_RUN )) && echo "dry run: the slice's state is not asked; showing a preempted slice" >&2
  state=$(slice_state)
  if (( DRY_RUN )); then
    printf '%s\n' "${state%%$'\n'*}"
    state=PREEMPTED
  fi
  case "${state}" in
    READY|ACTIVE) echo "${NAME} is ${state}: setting it up and restarting training" >&2 ;;
    MISSING) cmd_create ;;
    CREATING|STARTING|RESTARTING|REPAIRING|ACCEPTED|PROVISIONING|WAITING_FOR_RESOURCES)
      wait_until_ready ;;
    *) echo "${NAME} is ${state}: deleting and creating it again" >&2; cmd_delete; cmd_create ;;
  esac
  cmd_setup
  cmd_train
}

cmd_exec() {
  on_workers "${WORKER:-all}" ". .venv/bin/activate && $(command_line "${EXTRA_ARGS[@]}")"
}

main() {
  parse_args "$@"
  validate
  "cmd_${COMMAND}"
}

main "$@"
