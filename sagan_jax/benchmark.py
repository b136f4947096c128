"""Times the compiled SAGAN train step on synthetic batches.

  python -m sagan_jax.benchmark --config=configs/imagenet.py --config.model.dtype=bfloat16 \
      --steps=20 --warmup=3 --peak_tflops=989 --json_out=/tmp/bench.json

Builds G, D, the state and the train step exactly as training does (`train.create_train_step`,
`train.compile_train_step` over the mesh of all devices) and times, after warm-up, the full step,
the D step(s) alone and the G step alone. It reports per phase: the step time, images/s (real
images read per second for the full and the D step, generated images per second for the G step),
the compile time, the FLOPs per step from XLA's cost analysis, the achieved TFLOP/s per device and
the MFU against --peak_tflops (default: the dense bf16 peak of a recognized device kind); and the
peak device memory (`memory_stats()`, 'n/a' where the backend has none).

FLOPs: XLA counts a loop body once and a custom call (cuDNN attention) as nothing. When the step
has loops (gradient accumulation, blockwise attention) or custom calls, the FLOPs are those of its
loop-free twin (grad_accum_steps = 1, einsum attention, same global batch): the same arithmetic
the model needs, so MFU stays comparable across settings (recomputation is not counted).

Without a TPU: `--topology=v5e-8` (any name of `sagan_jax.tpu_compile.SLICES`: v4-8, v4-32,
v5e-8 / v5litepod-8, v5e-16, v5p-8, v6e-8, ...) compiles, without running, the same step for that
slice with libtpu's compile-only client (JAX stays on the CPU) and reports per device the
argument, output, temporary and code bytes, the total against the chip's HBM and whether it fits,
XLA's FLOPs per step, XLA's cost-model step time (an estimate) and the compile time; with
`--max_batch` it searches the largest global batch that fits (one compile per probe; with
`--json_out=F` the probes go to F.probes.jsonl as they end, and the same command started again
after an interruption resumes the search from them):

  python -m sagan_jax.benchmark --config=configs/imagenet.py --config.model.dtype=bfloat16 \
      --topology=v5e-8 --max_batch --json_out=v5e-8.json

The input pipeline alone, without the model: `--input_only` times the config's real training
iterator (images/s, per host core) and, with `--resume_at=0,0.5,0.99`, the time to its first batch
when resumed at those shares of an epoch (sagan_jax.input_benchmark):

  python -m sagan_jax.benchmark --config=configs/imagenet.py --input_only --steps=200

Nothing but --input_only imports TensorFlow, tfds or clu: the step benchmark and the TPU compile
run where only jax, flax, optax and ml_collections are installed.
"""

import json
import os
import sys
from typing import Optional, Sequence

from absl import flags

from sagan_jax import cli
from sagan_jax.errors import ConfigError

PHASE_NAMES = ('train_step', 'd_step', 'g_step')  # step_benchmark.PHASES, for --help.


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer('steps', 10, 'Timed steps per phase.', flag_values=fv)
  flags.DEFINE_integer('warmup', 2, 'Untimed steps per phase after compiling.', flag_values=fv)
  flags.DEFINE_float('peak_tflops', None, 'Peak TFLOP/s of one device for MFU (default: known '
                     'dense bf16 peaks of H200/H100 and TPU v4/v5e/v5p/v6e).', flag_values=fv)
  flags.DEFINE_string('json_out', None, 'Also write the numbers to this JSON file.',
                      flag_values=fv)
  flags.DEFINE_list('phases', list(PHASE_NAMES), 'Phases to compile and time.',
                    flag_values=fv)
  flags.DEFINE_string('topology', None, 'Compile (not run) the train step for this TPU slice '
                      'from any machine (needs libtpu): v4-8, v4-32, v5e-8 (v5litepod-8), '
                      'v5e-16, v5p-8, v6e-8, ... (sagan_jax.tpu_compile.SLICES).', flag_values=fv)
  flags.DEFINE_bool('input_only', False, 'Time the training input pipeline alone (no model): '
                    '--steps host batches after --warmup.', flag_values=fv)
  flags.DEFINE_list('resume_at', [], 'With --input_only: also time the first batch of an '
                    'iterator resumed at these shares of an epoch (e.g. 0,0.5,0.99).',
                    flag_values=fv)
  flags.DEFINE_bool('max_batch', False, 'With --topology: search the largest global batch that '
                    'fits the slice (one compile per probe). With --json_out=F each probe is '
                    'also appended to F.probes.jsonl as it ends, and a search started again with '
                    'the same F and config compiles only the probes not found there.',
                    flag_values=fv)


def benchmark(fv: flags.FlagValues) -> int:
  """The tool: checks the config, times the phases, prints the table (and writes the JSON)."""
  # pylint: disable=g-import-not-at-top  (jax loads after the flags: fast --help)
  import jax
  from sagan_jax import config_check
  from sagan_jax import distributed
  from sagan_jax import step_benchmark
  from sagan_jax import tpu_compile
  if fv.json_out and not os.path.isdir(os.path.dirname(os.path.abspath(fv.json_out))):
    # Checked first: the file (and a search's probes beside it) is written after the compiles.
    raise ConfigError(f'--json_out={fv.json_out}: its folder does not exist; create it or name '
                      'a file in an existing folder')
  if fv.input_only:
    results = _input_only(fv)
  elif fv.topology:
    tpu_compile.get_slice(fv.topology)
    tpu_compile.check_libtpu()
    config_check.check_config(fv.config)
    jax.config.update('jax_platforms', 'cpu')  # libtpu compiles; nothing runs on a TPU.
    if fv.max_batch:
      results = tpu_compile.max_batch(fv.config, fv.topology, journal=fv.json_out and (
          fv.json_out + '.probes.jsonl'))
    else:
      results = tpu_compile.compile_for_slice(fv.config, fv.topology)
    print(tpu_compile.format_report(results))
  else:
    if fv.max_batch:
      raise ConfigError('--max_batch searches the batch that fits a TPU slice: add '
                        '--topology=NAME (e.g. --topology=v5e-8)')
    distributed.set_cpu_devices(fv.config.get('cpu_devices', 0))
    config_check.check_config(fv.config)
    results = step_benchmark.run_benchmark(fv.config, fv.steps, fv.warmup, fv.peak_tflops,
                                           fv.phases)
    print(step_benchmark.format_report(results))
  if fv.json_out:
    with open(fv.json_out, 'w') as f:
      json.dump(results, f, indent=2)
  return 0


def _input_only(fv: flags.FlagValues):
  """--input_only: the training iterator's throughput and resume times."""
  # pylint: disable=g-import-not-at-top
  from sagan_jax import config_check
  from sagan_jax import input_benchmark
  try:
    shares = [float(x) for x in fv.resume_at]
  except ValueError:
    shares = [-1.0]
  if any(not 0 <= x < 1 for x in shares):
    raise ConfigError(f'--resume_at={",".join(fv.resume_at)}: give shares of an epoch in [0, 1), '
                      'e.g. --resume_at=0,0.5,0.99')
  if fv.steps < 1 or fv.warmup < 0:
    raise ConfigError(f'--steps={fv.steps} and --warmup={fv.warmup}: use --steps >= 1 and '
                      '--warmup >= 0')
  cli.import_tensorflow()
  config_check.check_config(fv.config)
  results = input_benchmark.run_input_benchmark(fv.config, fv.steps, fv.warmup, shares)
  print(input_benchmark.format_report(results))
  return results


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run_tool(__doc__, define_flags, benchmark, argv, takes_config=True)


if __name__ == '__main__':
  sys.exit(main())
