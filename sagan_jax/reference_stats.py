"""Reference statistics of the training images for FID, KID and precision/recall.

  python -m sagan_jax.reference_stats --config=configs/imagenet.py --out=stats/imagenet128.npz \
      [--config.data.tfds_data_dir=...] [--num_images=50000] [--inception_path=PATH]

reads up to --num_images training images (input_pipeline.create_eval_iterator: a seeded shuffled
pass, so fewer than all are a random subset), at the config's resolution and channels, with flips
off, rounds them to 8-bit levels (as generated samples are), and writes an .npz with `mu` and
`sigma` of their FID Inception pool3 features (pytorch-fid's keys), `features` (the first 10,000,
a random subset: KID and precision/recall need them), `feature_dim`, `resolution`, `channels`,
`num_images` and `info` (JSON: the data set, split and network). The evaluator refuses a file
whose feature size or resolution differs from its generator's. One process reads the whole split:
run it on one host.
"""

import sys

from absl import flags

from sagan_jax import cli


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('out', None, 'Output .npz (local or gs://).', flag_values=fv)
  flags.DEFINE_integer('num_images', 50_000, 'Training images to read (at most the split).',
                       flag_values=fv)
  flags.DEFINE_integer('batch_size', 256, 'Images per batch over all devices.',
                       flag_values=fv)
  flags.DEFINE_string('inception_path', None, 'FID Inception weights (.pth or converted .npz); '
                      'default: eval.inception_path, then $SAGAN_INCEPTION_PATH.', flag_values=fv)


# --help answers before the imports below load jax and flax (seconds).
if __name__ == '__main__':
  cli.exit_if_help(__doc__, define_flags, takes_config=True)

# pylint: disable=g-import-not-at-top,wrong-import-position
from typing import Any, Dict, Optional, Sequence, Tuple

from absl import logging
import jax

from sagan_jax import config_check
from sagan_jax import sharding
from sagan_jax.errors import ConfigError
from sagan_jax.evaluation import features
from sagan_jax.evaluation import inception_weights
from sagan_jax.evaluation import metrics


def real_features(data_config, features_fn, num_images: int, batch_size: int,
                  keep: int = metrics.REFERENCE_FEATURES_KEPT, split: Optional[str] = None
                  ) -> Tuple[int, Dict[str, features.FeatureSet]]:
  """(count, FeatureSets by network) of the first `num_images` real images (at most the split)
  of the data layer's eval pass, flips off; `features_fn` is one of features.create_features_fn."""
  from sagan_jax import input_pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
  batches = input_pipeline.create_eval_iterator(data_config, batch_size, split, num_images)
  return batches.num_examples, features.feature_sets(features_fn, batches, keep)


def compute_reference_stats(config, out: str, num_images: int = 50_000, batch_size: int = 256,
                            inception_path: Optional[str] = None,
                            net: Optional[features.FeatureNet] = None) -> Dict[str, Any]:
  """Writes the reference .npz of the module doc to `out`; returns its info.

  `net` replaces the FID Inception (whose weights must otherwise exist: ConfigError if not).
  """
  if net is None:
    path = inception_weights.inception_weights_path(
        inception_path or config.eval.get('inception_path'))
    if path is None:
      raise ConfigError(inception_weights.missing_weights_message(None))
    net = features.inception_net(inception_weights.load_variables(path), path)
  if num_images <= net.feature_dim:
    raise ConfigError(f'--num_images={num_images}: the covariance of {net.feature_dim}-d features '
                      f'needs more images than that (at least {net.feature_dim + 1}; 50,000 is '
                      'the standard)')
  mesh = sharding.create_mesh(jax.local_devices())
  features_fn = features.create_features_fn([net], mesh, batch_size)
  count, sets = real_features(config.data, features_fn, num_images, batch_size)
  if count < num_images:
    logging.warning('%s/%s holds %d images, fewer than --num_images=%d: used all of them',
                    config.data.name, config.data.split, count, num_images)
  mu, sigma = sets[net.name].stats.statistics()
  info = {'resolution': config.data.resolution, 'channels': config.data.channels,
          'num_images': count, 'data': config.data.name, 'split': config.data.split,
          'network': net.description, 'pixels': 'rounded to 8-bit levels, no flips'}
  metrics.save_reference(out, mu, sigma, sets[net.name].stats.kept(), **info)
  return info


def compute(fv: flags.FlagValues) -> int:
  """The tool: checks the config, writes --out and prints what it wrote."""
  cli.check_flags(fv, positive=('num_images', 'batch_size'))
  config_check.check_config(fv.config)
  cli.import_tensorflow()
  info = compute_reference_stats(fv.config, fv.out, fv.num_images, fv.batch_size,
                                 fv.inception_path)
  print(f"wrote {fv.out}: {info['num_images']} {info['data']}/{info['split']} images at "
        f"{info['resolution']} px")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.run_tool(__doc__, define_flags, compute, argv, takes_config=True,
                      required=('out',))


if __name__ == '__main__':
  sys.exit(main())
