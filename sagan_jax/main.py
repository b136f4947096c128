"""Trains SAGAN: `python -m sagan_jax.main --config=configs/imagenet.py --workdir=DIR`.

Config fields are overridden on the command line (`--config.model.ch=96`); `--config=imagenet`
names a config installed with the package. Training resumes from WORKDIR's newest checkpoint.
A wrong setting ends with one `error:` line naming the fix (exit code 2) before WORKDIR is
touched; a run that cannot go on (a non-finite loss, a checkpoint that cannot be written) with
one line and exit code 3.
"""

import sys

from absl import flags

from sagan_jax import cli


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'Directory (local or gs://) for checkpoints, logs, samples.',
                      flag_values=flag_values)
  flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0, for multi-process '
                      'runs without TPU/SLURM detection.', flag_values=flag_values)
  flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).',
                       flag_values=flag_values)
  flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1 (with '
                       '--coordinator_address).', flag_values=flag_values)
  flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'], 'jax.distributed: auto '
                    '(explicit flags, TPU VM or SLURM), on (always), off.', flag_values=flag_values)


def train(flag_values: flags.FlagValues) -> None:
  """Starts jax.distributed and trains; train_and_evaluate checks the config before any write."""
  # pylint: disable=g-import-not-at-top  (jax and TensorFlow load after the flags: fast --help)
  cli.import_tensorflow()
  from sagan_jax import distributed
  from sagan_jax import train_loop
  config = flag_values.config
  distributed.set_cpu_devices(config.get('cpu_devices', 0))
  distributed.set_compilation_cache(config.get('compilation_cache_dir'))
  distributed.initialize(flag_values.coordinator_address, flag_values.num_processes,
                         flag_values.process_id, mode=flag_values.distributed)
  train_loop.train_and_evaluate(config, flag_values.workdir)


def main(argv=None) -> int:
  return cli.run_tool(__doc__, define_flags, train, argv, takes_config=True, required=('workdir',))


if __name__ == '__main__':
  sys.exit(main())
