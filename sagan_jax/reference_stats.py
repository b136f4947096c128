"""Reference statistics of the training images for FID, KID and precision/recall.

  python -m sagan_jax.reference_stats --config=configs/imagenet.py --out=stats/imagenet128.npz \
      [--config.data.tfds_data_dir=...] [--num_images=50000] [--inception_path=PATH]

reads up to --num_images training images through the training input pipeline, at the config's
resolution and channels, with flips off, rounds them to 8-bit levels (as generated samples are),
and writes an .npz with `mu` and `sigma` of their FID Inception pool3 features (pytorch-fid's
keys), `features` (the first 10,000, a random subset since the pipeline shuffles: KID and
precision/recall need them), `feature_dim`, `resolution`, `channels`, `num_images` and `info`
(JSON: the data set, split and network). The evaluator refuses a file whose feature size or
resolution differs from its generator's. One process reads the whole split: run it on one host.
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
import copy
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

from absl import logging
import jax
import ml_collections
import numpy as np

from sagan_jax import config_check
from sagan_jax import features
from sagan_jax import inception
from sagan_jax import metrics
from sagan_jax import sharding
from sagan_jax.errors import ConfigError


def real_image_batches(config, num_images: Optional[int], batch_size: int,
                       split: Optional[str] = None, random_flip: bool = False, seed: int = 0
                       ) -> Tuple[int, Iterator[Dict[str, np.ndarray]]]:
  """The data set's images as training reads them (resolution, channels), flips off by default.

  Returns (count, iterator of {'image': float32 [b, H, W, C] in [-1, 1], 'label': int32 [b]})
  where count = min(num_images, the split's size) images come in all; with num_images None the
  iterator is endless and count the split's size.
  """
  from sagan_jax import input_pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
  data_config = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
  data_config.data.random_flip = random_flip
  if split is not None:
    data_config.data.split = split
  data_config.train.d_steps = 1

  def create_iterator(batch):
    data_config.train.batch_size = batch
    return input_pipeline.create_train_iterator(data_config, seed, process_index=0,
                                                process_count=1)

  # The split's size (this process reads all of it); no batch may be larger.
  available = create_iterator(1)._source.num_examples  # pylint: disable=protected-access
  count = available if num_images is None else min(num_images, available)
  batch_size = min(batch_size, count)
  iterator = create_iterator(batch_size)

  def endless():
    while True:
      yield {k: v[0] for k, v in next(iterator).items()}

  def finite():
    for _, num in features.batch_counts(count, batch_size):
      yield {k: v[0, :num] for k, v in next(iterator).items()}

  return count, endless() if num_images is None else finite()


def real_features(config, features_fn, num_images: int, batch_size: int,
                  keep: int = metrics.REFERENCE_FEATURES_KEPT, split: Optional[str] = None
                  ) -> Tuple[int, Dict[str, features.FeatureSet]]:
  """FeatureSets (by network) of up to `num_images` real images of the configured data, flips
  off; `features_fn` is one of features.create_features_fn."""
  count, batches = real_image_batches(config, num_images, batch_size, split)
  sets = {}
  for batch in batches:
    for name, out in features_fn(batch['image']).items():
      sets.setdefault(name, features.FeatureSet(keep)).update(out)
  return count, sets


def compute_reference_stats(config, out: str, num_images: int = 50_000, batch_size: int = 256,
                            inception_path: Optional[str] = None,
                            net: Optional[features.FeatureNet] = None) -> Dict[str, Any]:
  """Writes the reference .npz of the module doc to `out`; returns its info.

  `net` replaces the FID Inception (whose weights must otherwise exist: ConfigError if not).
  """
  if net is None:
    path = inception.inception_weights_path(inception_path or config.eval.get('inception_path'))
    if path is None:
      raise ConfigError(inception.missing_weights_message(None))
    net = features.inception_net(inception.load_variables(path), path)
  if num_images <= net.feature_dim:
    raise ConfigError(f'--num_images={num_images}: the covariance of {net.feature_dim}-d features '
                      f'needs more images than that (at least {net.feature_dim + 1}; 50,000 is '
                      'the standard)')
  mesh = sharding.create_mesh(jax.local_devices())
  features_fn = features.create_features_fn([net], mesh, batch_size)
  count, sets = real_features(config, features_fn, num_images, batch_size)
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
