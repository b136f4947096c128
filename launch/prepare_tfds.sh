#!/usr/bin/env bash
# Prepares a tfds data set (imagenet2012 from its manual download, or cifar10) and copies it to a
# bucket, where TPU workers and GPU hosts read it (--tfds-data-dir of the other launch scripts).
#
#   launch/prepare_tfds.sh --dataset=imagenet2012 --manual-dir=DIR
#       [--data-dir=$HOME/tensorflow_datasets] [--bucket-dir=gs://BUCKET/tensorflow_datasets]
#       [--venv=.venv] [--dry-run]
#
# imagenet2012 needs ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in the manual dir (from
# image-net.org; this code never downloads them) and about 300 GB of disk for the build. The build
# uses tfds's Python API (the `tfds build` command also wants apache-beam). Only the prepared
# folder DATA_DIR/DATASET is copied, not the downloads. --dry-run prints the commands instead.
set -euo pipefail

ROOT=$(cd "${BASH_SOURCE[0]%/*}/.." && pwd)
# shellcheck source=launch/common.sh
source "${ROOT}/launch/common.sh"

DATASET=""
MANUAL_DIR=""
DATA_DIR="${HOME:-~}/tensorflow_datasets"
BUCKET_DIR=""
VENV=.venv
DRY_RUN=${DRY_RUN:-0}
# argv: DATASET DATA_DIR MANUAL_DIR (empty: none).
BUILD='import sys; import tensorflow_datasets as tfds; name, data_dir, manual_dir = sys.argv[1:]; '
BUILD+='config = tfds.download.DownloadConfig(manual_dir=manual_dir or None); '
BUILD+='tfds.builder(name, data_dir=data_dir).download_and_prepare(download_config=config)'

set_option() {
  [[ -n "$2" ]] || die "$1 needs a value (see launch/prepare_tfds.sh --help)"
  case "$1" in
    --dataset) DATASET=$2 ;;
    --manual-dir) MANUAL_DIR=$2 ;;
    --data-dir) DATA_DIR=$2 ;;
    --bucket-dir) BUCKET_DIR=${2%/} ;;
    --venv) VENV=$2 ;;
    *) die "unknown option $1 (see launch/prepare_tfds.sh --help)" ;;
  esac
}

parse_args() {
  parse_command_line "${BASH_SOURCE[0]}" "$@"
}

validate() {
  [[ -n "${DATASET}" ]] || die "no data set given: pass --dataset=imagenet2012 (or cifar10)"
  [[ -z "${BUCKET_DIR}" || "${BUCKET_DIR}" == gs://?* ]] ||
    die "--bucket-dir=${BUCKET_DIR} is not on gs://: pass --bucket-dir=gs://BUCKET/tensorflow_datasets"
  if [[ "${DATASET}" == imagenet2012* ]]; then
    [[ -n "${MANUAL_DIR}" ]] || die "imagenet2012 needs --manual-dir=DIR holding" \
      "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar"
    if (( ! DRY_RUN )); then
      local tar
      for tar in ILSVRC2012_img_train.tar ILSVRC2012_img_val.tar; do
        [[ -f "${MANUAL_DIR}/${tar}" ]] ||
          die "${MANUAL_DIR}/${tar} not found: download it from image-net.org into --manual-dir"
      done
    fi
  fi
  (( DRY_RUN )) || [[ -x "${VENV}/bin/python" ]] ||
    die "${VENV}/bin/python not found: run bash launch/setup_venv.sh --accelerator=cpu first"
  if [[ -n "${BUCKET_DIR}" ]] && (( ! DRY_RUN )); then
    require_command gcloud "install the Google Cloud CLI, or copy ${DATA_DIR}/${DATASET%%/*} yourself"
  fi
}

main() {
  parse_args "$@"
  cd "${ROOT}"
  validate
  run "${VENV}/bin/python" -c "${BUILD}" "${DATASET}" "${DATA_DIR}" "${MANUAL_DIR}"
  if [[ -n "${BUCKET_DIR}" ]]; then
    run gcloud storage cp --recursive "${DATA_DIR}/${DATASET%%/*}" "${BUCKET_DIR}/"
  fi
}

main "$@"
