"""Converts pytorch-fid's pt_inception-2015-12-05-6726825d.pth to the Flax .npz this package loads.

  python -m sagan_jax.inception --inception_path=pt_inception-2015-12-05-6726825d.pth \
      --out=inception.npz

The network is sagan_jax.evaluation.inception, the weights' reader and writer
sagan_jax.evaluation.inception_weights.
"""

import sys

from absl import flags

from sagan_jax import cli


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('inception_path', None, "pytorch-fid's state_dict (.pth).", flag_values=fv)
  flags.DEFINE_string('out', None, 'Output .npz of the Flax variables.', flag_values=fv)


# --help answers before the imports below load jax and flax (seconds).
if __name__ == '__main__':
  cli.exit_if_help(__doc__, define_flags)

# pylint: disable=g-import-not-at-top,wrong-import-position
from flax import traverse_util

from sagan_jax.evaluation import inception_weights


def convert(fv: flags.FlagValues) -> int:
  """The tool: reads the .pth (ConfigError if it is not the FID Inception) and writes the .npz."""
  variables = inception_weights.load_variables(fv.inception_path)
  inception_weights.save_npz(variables, fv.out)
  count = len(traverse_util.flatten_dict(variables))
  print(f'wrote {fv.out}: {count} arrays (params and batch_stats) from {fv.inception_path}')
  return 0


def main(argv=None) -> int:
  return cli.run_tool(__doc__, define_flags, convert, argv, required=('inception_path', 'out'))


if __name__ == '__main__':
  sys.exit(main())
