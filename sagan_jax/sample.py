"""Generates images from a training workdir's checkpoint, restoring the generator alone.

  python -m sagan_jax.sample --workdir=DIR [--step=N] [--raw] [--num_per_class=10]

writes DIR/generated/step_N.png (one row per class, `sample.num_rows` classes spread over all
labels) and DIR/generated/step_N.npz (the same uint8 images and their labels). Only G's
checkpoint item is read: no optimizer, no discriminator.
"""

import sys

from absl import app
from absl import flags
from etils import epath
import jax
import numpy as np

from sagan_jax import checkpointing
from sagan_jax import sampling
from sagan_jax.errors import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training workdir (local or gs://).')
flags.DEFINE_integer('step', None, 'Checkpoint step; the newest when not given.')
flags.DEFINE_bool('raw', False, "Use G's raw weights instead of their EMA.")
flags.DEFINE_integer('num_per_class', 10, 'Samples per class (columns of the grid).')
flags.DEFINE_integer('seed', 0, 'Seed of the latents.')
flags.DEFINE_string('output_dir', None, 'Where to write; default WORKDIR/generated.')


def generate_grid(workdir: str, step, use_ema: bool, num_per_class: int, seed: int,
                  output_dir=None) -> epath.Path:
  """Restores G from WORKDIR and writes the PNG grid and the .npz; returns the PNG's path."""
  config, generator, params, g_state, step = checkpointing.load_generator(workdir, step, use_ema)
  config.sample.num_columns = num_per_class
  z, labels = sampling.grid_latents(config.sample, config.model.z_dim, config.data.num_classes,
                                    seed)
  images = sampling.to_uint8(sampling.create_sample_fn(generator)(params, g_state, z, labels))
  rows = len(images) // num_per_class
  output_dir = epath.Path(output_dir or epath.Path(workdir) / 'generated')
  output_dir.mkdir(parents=True, exist_ok=True)
  png = output_dir / f'step_{step:07d}.png'
  if jax.process_index() == 0:
    sampling.save_png(png, sampling.image_grid(images, rows))
    with (output_dir / f'step_{step:07d}.npz').open('wb') as f:
      np.savez(f, images=images, labels=labels)
  return png


def main(argv):
  del argv
  try:
    png = generate_grid(FLAGS.workdir, FLAGS.step, not FLAGS.raw, FLAGS.num_per_class, FLAGS.seed,
                        FLAGS.output_dir)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'wrote {png}')


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
