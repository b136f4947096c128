"""Trains SAGAN: `python -m sagan_jax.main --config=configs/imagenet.py --workdir=DIR`.

Config fields are overridden on the command line (`--config.model.ch=96`). Training resumes from
WORKDIR's newest checkpoint. A wrong setting ends with one line naming the fix (exit code 2).
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sagan_jax import cli
from sagan_jax.errors import ConfigError
from sagan_jax.errors import TrainingError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory (local or gs://) for checkpoints, logs, samples.')
flags.DEFINE_string('coordinator_address', None,
                    'HOST:PORT of process 0, for multi-process runs without TPU/SLURM detection.')
flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1 (with '
                     '--coordinator_address).')
flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                  'jax.distributed: auto (explicit flags, TPU VM or SLURM), on (always), off.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(cli.quiet_libraries)
  from sagan_jax import distributed
  from sagan_jax import train_loop
  try:
    distributed.set_cpu_devices(FLAGS.config.get('cpu_devices', 0))
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           mode=FLAGS.distributed)
    train_loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ConfigError, TrainingError) as e:
    logging.flush()
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2 if isinstance(e, ConfigError) else 3)


if __name__ == '__main__':
  app.run(main)
