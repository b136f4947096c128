"""tf.data input pipelines: Fashion-MNIST IDX files and prepared tfds data sets.

Every pipeline yields numpy dicts {'image': float32 [d_steps, B, H, W, C] in [-1, 1],
'label': int32 [d_steps, B]} where B is this process's share of the global batch.
TensorFlow is imported here only, so models and the train step do not need it.
"""

import gzip
import os
import struct
from typing import Dict, Iterator, Tuple

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from sagan_jax.errors import ConfigError

FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}

# Keep TensorFlow off accelerators: tf.data only runs on the host.
tf.config.set_visible_devices([], 'GPU')


def _read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally gzipped) into a numpy array."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  _, dtype_code, ndim = struct.unpack('>HBB', data[:4])
  if dtype_code != 0x08:
    raise ConfigError(f'{path} is not an unsigned-byte IDX file')
  shape = struct.unpack('>' + 'I' * ndim, data[4:4 + 4 * ndim])
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist_paths(directory: str, split: str):
  """The split's image and label files; ConfigError naming the fix when one is missing."""
  paths = [os.path.join(directory, name) for name in FASHION_MNIST_FILES[split]]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise ConfigError(
        f'Fashion-MNIST not found ({missing[0]} is missing): install Debian\'s package with '
        f'`apt-get install dataset-fashion-mnist` (files go to /usr/share/datasets/fashion-mnist) '
        f'or set --config.data.fashion_mnist_dir to the folder holding the IDX .gz files')
  return paths


def load_fashion_mnist(directory: str, split: str = 'train') -> Tuple[np.ndarray, np.ndarray]:
  """Returns uint8 images [N, 28, 28, 1] and int32 labels [N] of a Fashion-MNIST split."""
  paths = _fashion_mnist_paths(directory, split)
  images, labels = (_read_idx(p) for p in paths)
  if images.shape[0] != labels.shape[0]:
    raise ConfigError(f'{paths[0]} and {paths[1]} hold different numbers of examples')
  return images[..., None], labels.astype(np.int32)


def _to_resolution(image: tf.Tensor, resolution: int) -> tf.Tensor:
  """Centre crop to the short side, then area resize to `resolution` (padding 28 px to 32 px)."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  if image.shape[0] == 28 and resolution == 32:  # MNIST-style: pad with the background.
    return tf.pad(image, [[2, 2], [2, 2], [0, 0]])
  side = tf.minimum(height, width)
  image = tf.image.crop_to_bounding_box(image, (height - side) // 2, (width - side) // 2, side,
                                        side)
  return tf.image.resize(image, (resolution, resolution), method='area')


def preprocess(example: Dict[str, tf.Tensor], data_config) -> Dict[str, tf.Tensor]:
  """uint8 image -> float32 in [-1, 1] at the configured resolution, with an optional flip."""
  image = tf.cast(example['image'], tf.float32)
  image = _to_resolution(image, data_config.resolution)
  if data_config.random_flip:
    image = tf.image.stateless_random_flip_left_right(image, example['seed'])
  image = image / 127.5 - 1.0
  image.set_shape((data_config.resolution, data_config.resolution, data_config.channels))
  return {'image': image, 'label': tf.cast(example['label'], tf.int32)}


def _check_tfds(data_config) -> None:
  builder = tfds.builder(data_config.name, data_dir=data_config.tfds_data_dir)
  if not builder.is_prepared():
    how = ('ImageNet needs a manual download: put ILSVRC2012_img_train.tar and '
           'ILSVRC2012_img_val.tar in <data_dir>/downloads/manual/ and run '
           '`tfds build imagenet2012 --data_dir=<data_dir>`'
           if data_config.name == 'imagenet2012' else
           f'run `tfds build {data_config.name} --data_dir=<data_dir>` on a machine with internet')
    raise ConfigError(
        f"tfds data set '{data_config.name}' is not prepared in {builder.data_dir}: {how}, then "
        f'set --config.data.tfds_data_dir=<data_dir> (this code never downloads)')


def _tfds_source(data_config) -> tf.data.Dataset:
  builder = tfds.builder(data_config.name, data_dir=data_config.tfds_data_dir)
  split = tfds.split_for_jax_process(data_config.split, drop_remainder=True)
  ds = builder.as_dataset(split=split, shuffle_files=False)
  return ds.map(tf.autograph.experimental.do_not_convert(
      lambda ex: {'image': ex['image'], 'label': ex['label']}))


def _fashion_mnist_source(data_config) -> tf.data.Dataset:
  images, labels = load_fashion_mnist(data_config.fashion_mnist_dir, data_config.split)
  ds = tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels})
  return ds.shard(jax.process_count(), jax.process_index())


SOURCES = {'fashion_mnist': _fashion_mnist_source, 'imagenet2012': _tfds_source,
           'cifar10': _tfds_source}


def check_source(data_config) -> None:
  """Raises ConfigError, naming the fix, when the configured data cannot be read."""
  if data_config.name not in SOURCES:
    raise ConfigError(f"unknown data.name '{data_config.name}': set --config.data.name to one of "
                      f'{sorted(SOURCES)}')
  if data_config.name == 'fashion_mnist':
    _fashion_mnist_paths(data_config.fashion_mnist_dir, data_config.split)
  else:
    _check_tfds(data_config)


def create_train_iterator(config, seed: int) -> Iterator[Dict[str, np.ndarray]]:
  """The endless, shuffled training stream of this process, batched as the train step wants."""
  data_config = config.data
  check_source(data_config)
  local_batch = config.train.batch_size // jax.process_count()
  ds = SOURCES[data_config.name](data_config)
  ds = ds.shuffle(data_config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
  # One stateless seed per example keeps the random flips deterministic.
  seeds = tf.data.Dataset.random(seed=seed).batch(2)

  @tf.autograph.experimental.do_not_convert
  def add_seed_and_preprocess(example, example_seed):
    return preprocess({**example, 'seed': example_seed}, data_config)

  ds = tf.data.Dataset.zip((ds, seeds)).map(add_seed_and_preprocess,
                                            num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True).batch(config.train.d_steps, drop_remainder=True)
  return ds.prefetch(2).as_numpy_iterator()
