#!/usr/bin/env bash
# Benchmarks the SAGAN train step on one GPU (sized for an H200) with synthetic batches.
# Needs jax (CUDA build), flax, optax and ml_collections; no TensorFlow, tfds or clu.
#
#   tools/device_bench.sh [--wheels DIR] [--out DIR] [--steps N] [--dry-run]
#
#   --wheels DIR  pip-install ml-collections (and its needs) from DIR when it is not importable
#                 (honours PIP_TARGET; add that folder to PYTHONPATH yourself)
#   --out DIR     where the JSON files go (default: $OUT, else ./bench_out)
#   --dry-run     print the commands instead of running them
#
# Runs: configs/imagenet.py (128 px, ch 64, batch 256) in bfloat16 and float32, and
# configs/imagenet256.py (attention at 64 and 128) at batch 128 in bfloat16; attention 'auto'
# (cuDNN flash attention in bf16, blockwise in f32); MFU against the H200's dense bf16 peak.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
OUT_DIR="${OUT:-bench_out}"
WHEELS=""
STEPS=10
WARMUP=2
PEAK_TFLOPS=989
ATTENTION=auto
# XLA's CPU-compiled estimates of one step's temporaries: 128 px batch 256: 42 GiB (f32,
# blockwise attention), 76 GiB (bf16, fused); 256 px batch 64: 41 GiB (bf16, blockwise). 141 GB
# hold 256 px at 128; lower it if a run stops with RESOURCE_EXHAUSTED.
BATCH_256PX=128
DRY_RUN=0

usage() { sed -n '2,14p' "$0"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
    --out) OUT_DIR="${2:?--out needs a folder}"; shift 2 ;;
    --steps) STEPS="${2:?--steps needs a number}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

if [[ -n "$WHEELS" ]] && ! "$PYTHON" -c 'import ml_collections' 2>/dev/null; then
  run "$PYTHON" -m pip install --no-index --find-links "$WHEELS" ml-collections
fi
run mkdir -p "$OUT_DIR"

failed=()
bench() {  # NAME CONFIG [--config.FIELD=VALUE ...]: one JSON file per run; failures are listed.
  local name="$1" config="$2"
  shift 2
  run env PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m sagan_jax.benchmark \
    --config="$config" --config.model.attention_impl="$ATTENTION" "$@" --steps="$STEPS" --warmup="$WARMUP" --peak_tflops="$PEAK_TFLOPS" \
    --json_out="$OUT_DIR/$name.json" || failed+=("$name")
}

bench imagenet128_bf16 configs/imagenet.py --config.model.ch=64 --config.train.batch_size=256 \
  --config.model.dtype=bfloat16
bench imagenet128_f32 configs/imagenet.py --config.model.ch=64 --config.train.batch_size=256 \
  --config.model.dtype=float32
bench imagenet256_bf16 configs/imagenet256.py --config.model.ch=64 \
  --config.train.batch_size="$BATCH_256PX" --config.model.dtype=bfloat16

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "error: failed runs: ${failed[*]}" >&2
  exit 1
fi
[[ "$DRY_RUN" == 1 ]] || echo "JSON files in $OUT_DIR"
