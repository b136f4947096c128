"""Generates images from a training workdir's checkpoint, restoring the generator alone.

  python -m sagan_jax.sample --workdir=DIR [--step=N] [--raw] [--num_per_class=10]
      [--truncation=0.5] [--num_samples=1000] [--interp_classes=0,9]

writes to DIR/generated/ (or --output_dir), for checkpoint step N:
  step_N.png               one row per class (`sample.num_rows` classes spread over all labels)
  step_N_random.png        classes drawn at random (one grid row per `num_per_class` samples)
  step_N_truncated.png     the class grid again with z truncated at --truncation (when > 0)
  step_N_interp_z.png      each row: one class, z moving on a line between two latents
  step_N_interp_class.png  each row: one z, the class blending from one label to another
  step_N.npz               --num_samples images with uniformly drawn labels ('images', 'labels')
Only G's checkpoint item is read: no optimizer, no discriminator.
"""

import sys
from typing import Any, Dict, Optional, Sequence

from absl import flags
import numpy as np

from sagan_jax import cli
from sagan_jax.errors import ConfigError


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'Training workdir (local or gs://).', flag_values=fv)
  flags.DEFINE_integer('step', None, 'Checkpoint step; the newest when not given.',
                       flag_values=fv)
  flags.DEFINE_bool('raw', False, "Use G's raw weights instead of their EMA.", flag_values=fv)
  flags.DEFINE_integer('num_per_class', 10, 'Samples per row of the grids.', flag_values=fv)
  flags.DEFINE_float('truncation', 0.0, 'Threshold of the truncation trick (0: plain N(0, I)).',
                     flag_values=fv)
  flags.DEFINE_integer('num_samples', 1000, 'Samples in step_N.npz (labels drawn uniformly).',
                       flag_values=fv)
  flags.DEFINE_list('interp_classes', None, 'Two labels A,B for the class interpolation '
                    '(default: the first and last class).', flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'Seed of the latents and labels.', flag_values=fv)
  flags.DEFINE_string('output_dir', None, 'Where to write; default WORKDIR/generated.',
                      flag_values=fv)


def _check_args(num_classes: int, num_per_class: int, truncation: float,
                interp_classes: Sequence[int]) -> None:
  if num_per_class < 2:
    raise ConfigError(f'--num_per_class={num_per_class}: use 2 or more (interpolations need two '
                      'ends)')
  if truncation < 0:
    raise ConfigError(f'--truncation={truncation}: use a positive threshold, or 0 for none')
  if len(interp_classes) != 2 or not all(0 <= c < num_classes for c in interp_classes):
    raise ConfigError(f'--interp_classes={",".join(map(str, interp_classes))}: give two labels '
                      f'in [0, {num_classes - 1}], e.g. --interp_classes=0,{num_classes - 1}')


def write_samples(workdir: str, step: Optional[int] = None, use_ema: bool = True,
                  num_per_class: int = 10, truncation: float = 0.0, num_samples: int = 1000,
                  interp_classes: Optional[Sequence[int]] = None, seed: int = 0,
                  output_dir: Optional[str] = None) -> Dict[str, Any]:
  """Restores G from WORKDIR and writes the grids and the .npz; returns their paths by kind."""
  # pylint: disable=g-import-not-at-top  (jax loads after the flags: fast --help)
  from etils import epath
  import jax
  from sagan_jax import checkpointing
  from sagan_jax import latents
  from sagan_jax import sampling
  config, generator, params, g_state, step = checkpointing.load_generator(workdir, step, use_ema)
  num_classes, z_dim = config.data.num_classes, config.model.z_dim
  try:
    interp_classes = [int(c) for c in (interp_classes or (0, num_classes - 1))]
  except ValueError as e:
    raise ConfigError(f'--interp_classes={",".join(interp_classes)}: give two integer labels, '
                      f'e.g. --interp_classes=0,{num_classes - 1}') from e
  _check_args(num_classes, num_per_class, truncation, interp_classes)
  sample_fn = sampling.create_sample_fn(generator)
  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed)
  config.sample.num_columns = num_per_class
  rows = min(config.sample.num_rows, num_classes)

  def run(z, labels):
    return sampling.to_uint8(sample_fn(params, g_state, np.asarray(z, np.float32), labels))

  grids = {}
  z, labels = sampling.grid_latents(config.sample, z_dim, num_classes, seed)
  grids['classes'] = run(z, labels)
  grids['random'] = run(z, rng.integers(0, num_classes, len(z)).astype(np.int32))
  if truncation > 0:
    grids['truncated'] = run(latents.sample_z(key, len(z), z_dim, truncation), labels)
  ends = rng.standard_normal((2, rows, z_dim)).astype(np.float32)
  path = sampling.interpolate(ends[0], ends[1], num_per_class)  # [columns, rows, z_dim]
  grids['interp_z'] = run(path.transpose(1, 0, 2).reshape(-1, z_dim), labels[::num_per_class]
                          .repeat(num_per_class))
  mix = sampling.interpolate(*sampling.one_hot(interp_classes, num_classes), num_per_class)
  z_rows = rng.standard_normal((rows, z_dim)).astype(np.float32)
  grids['interp_class'] = run(z_rows.repeat(num_per_class, 0), np.tile(mix, (rows, 1)))

  npz_labels = rng.integers(0, num_classes, num_samples).astype(np.int32)
  images = sampling.generate(sample_fn, params, g_state, z_dim, npz_labels,
                             jax.random.fold_in(key, 1), truncation=truncation)

  output_dir = epath.Path(output_dir or epath.Path(workdir) / 'generated')
  names = {'classes': f'step_{step:07d}.png', 'random': f'step_{step:07d}_random.png',
           'truncated': f'step_{step:07d}_truncated.png',
           'interp_z': f'step_{step:07d}_interp_z.png',
           'interp_class': f'step_{step:07d}_interp_class.png'}
  paths = {kind: output_dir / names[kind] for kind in grids}
  paths['npz'] = output_dir / f'step_{step:07d}.npz'
  if jax.process_index() == 0:
    output_dir.mkdir(parents=True, exist_ok=True)
    for kind, grid in grids.items():
      sampling.save_png(paths[kind], sampling.image_grid(grid, len(grid) // num_per_class))
    with paths['npz'].open('wb') as f:
      np.savez(f, images=images, labels=npz_labels, truncation=np.float32(truncation))
  return paths


def sample(fv: flags.FlagValues) -> int:
  """The tool: writes the grids and the .npz and prints their paths."""
  cli.check_flags(fv, non_negative=('num_samples',))
  paths = write_samples(fv.workdir, fv.step, not fv.raw, fv.num_per_class, fv.truncation,
                        fv.num_samples, fv.interp_classes, fv.seed, fv.output_dir)
  for path in paths.values():
    print(f'wrote {path}')
  return 0


def main(argv=None) -> int:
  return cli.run_tool(__doc__, define_flags, sample, argv, required=('workdir',))


if __name__ == '__main__':
  sys.exit(main())
