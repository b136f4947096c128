#!/usr/bin/env bash
# Makes sure the Fashion-MNIST IDX files exist, installing Debian's dataset-fashion-mnist if needed.
#
#   FASHION_MNIST_DIR=DIR bash launch/get_fashion_mnist.sh [--dry-run]
#
# --dry-run prints the apt-get commands it would run instead of running them.
set -euo pipefail

FASHION_MNIST_DIR="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz
       t10k-labels-idx1-ubyte.gz)

DRY_RUN=0
case "${1-}" in
  '') ;;
  --dry-run) DRY_RUN=1 ;;
  *) echo "error: unexpected argument '$1': the only option is --dry-run" >&2; exit 2 ;;
esac

have_files() {
  local f
  for f in "${FILES[@]}"; do
    [[ -f "${FASHION_MNIST_DIR}/${f}" ]] || return 1
  done
}

if have_files; then
  exit 0
fi
if [[ "${FASHION_MNIST_DIR}" == /usr/share/datasets/fashion-mnist ]] && command -v apt-get >/dev/null; then
  SUDO=""
  if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null; then SUDO="sudo"; else
      echo "error: Fashion-MNIST is missing: run 'apt-get install dataset-fashion-mnist' as root" >&2
      exit 1
    fi
  fi
  if (( DRY_RUN )); then
    echo "${SUDO:+${SUDO} }apt-get update -q"
    echo "${SUDO:+${SUDO} }apt-get install -y -q dataset-fashion-mnist"
    exit 0
  fi
  echo "Installing Debian's dataset-fashion-mnist..."
  ${SUDO} apt-get update -q
  ${SUDO} apt-get install -y -q dataset-fashion-mnist
  have_files && exit 0
fi
echo "error: Fashion-MNIST IDX files not found in ${FASHION_MNIST_DIR}: install Debian's" \
  "dataset-fashion-mnist package, or put ${FILES[*]} in a folder and run" \
  "'make demo FASHION_MNIST_DIR=/that/folder'" >&2
exit 1
