"""tf.data input pipelines with an exactly resumable position.

Sources (`data.name`): 'imagenet2012' and 'cifar10' (prepared tfds sets, never downloaded),
'folder' (a folder of images, `data.folder_dir`) and 'fashion_mnist' (the IDX files).
`create_train_iterator` yields numpy dicts {'image': float32 [d_steps, B, H, W, C] in [-1, 1],
'label': int32 [d_steps, B]}, B = this process's share of the global batch.

Position. Each process numbers the examples it reads: `pos` counts its records across epochs
(epoch = pos // n, offset = pos % n, n = its share of the data). Every epoch's order is fixed by
(seed, process, epoch) and random flips by (seed, process, pos), so the stream is a function of
the seed alone. `it.position` is the int after the last record returned; an iterator created with
`position=it.position` yields exactly (bit for bit) the batches the old one would have yielded
next. Unreadable images are skipped (and logged) at the same records again, so they do not shift
the stream.

Cost of resuming. Folders and IDX files are read by index: resuming costs nothing. A tfds set is
a stream of records: its epoch order comes from a seeded file shuffle and a seeded shuffle buffer,
so resuming at `offset` reads and discards that epoch's first `offset` records (encoded bytes,
never decoded): at most one epoch of this process's share (for ImageNet on P processes, up to
~140 GB / P of reading) before the first batch.

TensorFlow is imported here only, so models and the train step do not need it.
"""

import functools
import gzip
import os
import struct
from typing import Dict, Optional, Tuple

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from sagan_jax import config_check
from sagan_jax.errors import ConfigError

FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
TFDS_NAMES = config_check.TFDS_SOURCES
SOURCES = config_check.DATA_SOURCES
# What tf.io.decode_image reads; other files in class folders are ignored.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp')
FOLDER_LAYOUTS = 'root/class/image.jpg or root/<data.split>/class/image.jpg'

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
  if split not in FASHION_MNIST_FILES:
    raise ConfigError(f"Fashion-MNIST has no split '{split}': set --config.data.split to "
                      f'train or test')
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


@functools.lru_cache(maxsize=4)
def list_image_folder(folder_dir: Optional[str], split: str) -> Tuple[Tuple[str, ...],
                                                                      Tuple[int, ...],
                                                                      Tuple[str, ...]]:
  """Lists a folder of images: (paths, labels, class names), sorted by class, then path.

  Layouts: `root/<split>/class/...` (tfds ImageFolder) when `root/<split>` exists, else
  `root/class/...`. Classes are the subfolders sorted by name (label = index); images are the
  files with IMAGE_EXTENSIONS anywhere below them. Cached: check_source and the iterator list once.
  """
  fix = f'set --config.data.folder_dir to a folder laid out as {FOLDER_LAYOUTS}'
  if not folder_dir or not tf.io.gfile.isdir(folder_dir):
    raise ConfigError(f'image folder {folder_dir!r} does not exist: {fix}')
  root = os.path.join(folder_dir, split)
  root = root if tf.io.gfile.isdir(root) else folder_dir
  classes = sorted(name.rstrip('/') for name in tf.io.gfile.listdir(root)
                   if tf.io.gfile.isdir(os.path.join(root, name)))
  paths, labels = [], []
  for label, name in enumerate(classes):
    found = []
    for directory, _, files in tf.io.gfile.walk(os.path.join(root, name)):
      found += [os.path.join(directory, f) for f in files
                if f.lower().endswith(IMAGE_EXTENSIONS)]
    paths += sorted(found)
    labels += [label] * len(found)
  if not paths:
    raise ConfigError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in class subfolders of '
                      f'{root}: {fix}')
  return tuple(paths), tuple(labels), tuple(classes)


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
  _check_num_classes(builder.info.features['label'].num_classes, data_config)


def _check_num_classes(num_classes: int, data_config) -> None:
  if num_classes > data_config.num_classes:
    raise ConfigError(f'{data_config.name} has {num_classes} classes but data.num_classes is '
                      f'{data_config.num_classes}: set --config.data.num_classes={num_classes}')


def check_source(data_config) -> None:
  """Raises ConfigError, naming the fix, when the configured data cannot be read."""
  if data_config.name not in SOURCES:
    raise ConfigError(f"unknown data.name '{data_config.name}': set --config.data.name to one of "
                      f'{sorted(SOURCES)}')
  if data_config.name == 'fashion_mnist':
    _fashion_mnist_paths(data_config.fashion_mnist_dir, data_config.split)
  elif data_config.name == 'folder':
    _, _, classes = list_image_folder(data_config.folder_dir, data_config.split)
    _check_num_classes(len(classes), data_config)
  else:
    _check_tfds(data_config)


def _derive_seed(*numbers: int) -> int:
  """A 32-bit seed that depends on every number (seed, process, epoch, ...)."""
  return int(np.random.SeedSequence([n % 2**64 for n in numbers]).generate_state(1)[0])


class _IndexedSource:
  """Records held as arrays (file paths or images): each epoch is a seeded index permutation."""

  def __init__(self, fields: Dict[str, np.ndarray], base_seed: int):
    self._fields, self._base_seed = fields, base_seed
    self.num_examples = len(fields['label'])

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng(_derive_seed(self._base_seed, epoch)).permutation(
        self.num_examples)

  def records(self, epoch: int, offset: int) -> tf.data.Dataset:
    """The epoch's records from `offset` on, each with its position 'pos'."""
    order = self._order(epoch)[offset:]
    start = epoch * self.num_examples + offset
    slices = {k: v[order] for k, v in self._fields.items()}
    slices['pos'] = np.arange(start, start + len(order), dtype=np.int64)
    return tf.data.Dataset.from_tensor_slices(slices)

  def describe(self, pos: int) -> str:
    if 'path' not in self._fields:
      return f'example {pos}'
    epoch, offset = divmod(pos, self.num_examples)
    return str(self._fields['path'][self._order(epoch)[offset]])


class _TfdsSource:
  """A prepared tfds set: per-epoch seeded file shuffle and shuffle buffer; see module doc."""

  def __init__(self, data_config, base_seed: int, process_index: int, process_count: int):
    self._builder = tfds.builder(data_config.name, data_dir=data_config.tfds_data_dir)
    self._split = tfds.split_for_jax_process(data_config.split, process_index=process_index,
                                             process_count=process_count, drop_remainder=True)
    self._buffer, self._base_seed = data_config.shuffle_buffer, base_seed
    self.num_examples = self._builder.info.splits[self._split].num_examples

  def records(self, epoch: int, offset: int) -> tf.data.Dataset:
    """The epoch's records from `offset` on (skipped before decoding), with positions."""
    read_config = tfds.ReadConfig(shuffle_seed=_derive_seed(self._base_seed, epoch, 0),
                                  try_autocache=False)
    ds = self._builder.as_dataset(split=self._split, shuffle_files=True, read_config=read_config,
                                  decoders={'image': tfds.decode.SkipDecoding()})
    ds = ds.map(tf.autograph.experimental.do_not_convert(
        lambda ex: {'encoded': ex['image'], 'label': ex['label']}))
    ds = ds.shuffle(self._buffer, seed=_derive_seed(self._base_seed, epoch, 1),
                    reshuffle_each_iteration=False).skip(offset)
    return ds.enumerate(start=epoch * self.num_examples + offset).map(
        tf.autograph.experimental.do_not_convert(lambda pos, ex: {**ex, 'pos': pos}))

  def describe(self, pos: int) -> str:
    return f'{self._builder.name} record {pos}'


def _create_source(data_config, base_seed: int, process_index: int, process_count: int):
  """This process's share of the data, evenly split over processes (the remainder is dropped)."""
  if data_config.name in TFDS_NAMES:
    return _TfdsSource(data_config, base_seed, process_index, process_count)
  if data_config.name == 'folder':
    paths, labels, _ = list_image_folder(data_config.folder_dir, data_config.split)
    fields = {'path': np.array(paths), 'label': np.array(labels, np.int32)}
  else:
    images, labels = load_fashion_mnist(data_config.fashion_mnist_dir, data_config.split)
    fields = {'image': images, 'label': labels}
  # Strided: sorted folders are grouped by class, and every process should see every class.
  used = len(fields['label']) // process_count * process_count
  return _IndexedSource({k: v[process_index:used:process_count] for k, v in fields.items()},
                        base_seed)


def _to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
  """Grayscale, gray+alpha, RGB or RGBA uint8 -> `channels` (alpha is dropped)."""
  if channels == 3:
    from_color, from_gray = lambda: image[..., :3], lambda: tf.tile(image[..., :1], [1, 1, 3])
  else:
    from_color = lambda: tf.image.rgb_to_grayscale(image[..., :3])
    from_gray = lambda: image[..., :1]
  if image.shape[-1] is None:  # Decoded files: known when the graph runs.
    image = tf.cond(tf.shape(image)[-1] >= 3, from_color, from_gray)
  else:
    image = from_color() if image.shape[-1] >= 3 else from_gray()
  image.set_shape((None, None, channels))
  return image


def _decode(example: Dict[str, tf.Tensor], channels: int) -> Dict[str, tf.Tensor]:
  """A record ('path', 'encoded' bytes or an 'image' array) -> uint8 image; raises if corrupt."""
  if 'image' in example:
    image = example['image']
  else:
    encoded = tf.io.read_file(example['path']) if 'path' in example else example['encoded']
    image = tf.io.decode_image(encoded, channels=0, dtype=tf.uint8, expand_animations=False)
  return {'image': _to_channels(image, channels), 'label': tf.cast(example['label'], tf.int32),
          'pos': example['pos']}


def _to_resolution(image: tf.Tensor, resolution: int) -> tf.Tensor:
  """Centre crop to the short side, then area resize to `resolution` (padding 28 px to 32 px)."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]

  def crop_and_resize():
    side = tf.minimum(height, width)
    square = tf.image.crop_to_bounding_box(image, (height - side) // 2, (width - side) // 2,
                                           side, side)
    return tf.image.resize(square, (resolution, resolution), method='area')

  if resolution != 32:
    return crop_and_resize()
  # MNIST-style 28 px images: pad with the background instead of blurring them up.
  return tf.cond((height == 28) & (width == 28),
                 lambda: tf.pad(image, [[2, 2], [2, 2], [0, 0]]), crop_and_resize)


def preprocess(example: Dict[str, tf.Tensor], data_config) -> Dict[str, tf.Tensor]:
  """uint8 image -> float32 in [-1, 1] at the configured resolution, flipped by example['seed']."""
  image = _to_resolution(tf.cast(example['image'], tf.float32), data_config.resolution)
  if data_config.random_flip:
    image = tf.image.stateless_random_flip_left_right(image, example['seed'])
  image = image / 127.5 - 1.0
  image.set_shape((data_config.resolution, data_config.resolution, data_config.channels))
  out = {'image': image, 'label': tf.cast(example['label'], tf.int32)}
  if 'pos' in example:
    out['pos'] = example['pos']
  return out


class TrainIterator:
  """The endless training stream of one process; `position` says where it stands (module doc).

  Each epoch is its own tf.data pipeline (records -> parallel decode -> skip unreadable ->
  parallel preprocess -> batch -> prefetch); the first batch of an epoch is completed with the
  last examples of the previous one, so batches run across epoch boundaries.
  """

  def __init__(self, source, data_config, base_seed: int, unit: int, d_steps: int,
               position: int):
    self._source, self._config, self._base_seed = source, data_config, base_seed
    self._unit, self._d_steps = unit, d_steps
    self.position = position
    self.num_skipped = 0  # Unreadable records skipped by this iterator.
    self._epoch, self._offset = divmod(position, source.num_examples)
    self._batches, self._front, self._epoch_count = None, 0, 0

  def __iter__(self):
    return self

  def _open_epoch(self, front: int):
    """The epoch's batches of `unit` examples, aligned so the first one holds `unit - front`.

    The previous epoch's last `front` examples complete that first batch on the host. To keep
    tf.data's batching (and its prefetch) instead of re-slicing every batch on the host, `front`
    blank fillers go ahead of the epoch's records; `_next_part` cuts them off.
    """
    data_config, base_seed = self._config, self._base_seed

    @tf.autograph.experimental.do_not_convert
    def preprocess_fn(example):
      seed = tf.stack([tf.constant(base_seed, tf.int64), example['pos']])
      return preprocess({**example, 'seed': seed}, data_config)

    ds = self._source.records(self._epoch, self._offset)
    ds = ds.map(tf.autograph.experimental.do_not_convert(
        lambda ex: _decode(ex, data_config.channels)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors()  # Corrupt images: the gap in 'pos' counts them.
    ds = ds.map(preprocess_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if front:
      res, channels = data_config.resolution, data_config.channels
      filler = {'image': tf.zeros((res, res, channels)), 'label': tf.constant(0, tf.int32),
                'pos': tf.constant(-1, tf.int64)}
      ds = tf.data.Dataset.from_tensors(filler).repeat(front).concatenate(ds)
    return ds.batch(self._unit).prefetch(2).as_numpy_iterator()

  def _next_part(self, count: int):
    """The next batch (or the rest of an epoch); opens epochs as needed."""
    while True:
      if self._batches is None:
        self._batches, self._front, self._epoch_count = self._open_epoch(count), count, 0
      try:
        part = next(self._batches)
      except StopIteration:
        if self._offset == 0 and self._epoch_count == 0:
          raise ConfigError(f'no readable image in a whole epoch of the {self._config.name} '
                            f'data: replace the corrupt files or check --config.data') from None
        self._batches, self._epoch, self._offset = None, self._epoch + 1, 0
        continue
      part = {k: v[self._front:] for k, v in part.items()}
      self._front = 0
      self._epoch_count += len(part['pos'])
      return part

  def _count_skipped(self, pos: np.ndarray) -> None:
    skipped = np.setdiff1d(np.arange(self.position, pos[-1] + 1), pos)
    if skipped.size:
      self.num_skipped += skipped.size
      logging.warning('Skipped %d unreadable image(s) so far (%d now: %s)', self.num_skipped,
                      skipped.size, ', '.join(self._source.describe(int(p)) for p in skipped[:3]))

  def __next__(self) -> Dict[str, np.ndarray]:
    parts, count = [], 0
    while count < self._unit:
      part = self._next_part(count)
      if len(part['pos']):
        parts.append(part)
        count += len(part['pos'])
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if len(parts) > 1 \
        else parts[0]
    pos = batch.pop('pos')
    self._count_skipped(pos)
    self.position = int(pos[-1]) + 1
    return {k: v.reshape((self._d_steps, -1) + v.shape[1:]) for k, v in batch.items()}


def create_train_iterator(config, seed: int, position: Optional[int] = None,
                          process_index: Optional[int] = None,
                          process_count: Optional[int] = None) -> TrainIterator:
  """The endless, shuffled training stream of one process, batched as the train step wants.

  Args:
    config: the full config (`data`, `train.batch_size` global, `train.d_steps`).
    seed: seeds the data order and the flips; keep it fixed across resumes.
    position: `it.position` of an earlier iterator with the same config and seed, to continue
      exactly where it stood; None or 0 starts at the beginning.
    process_index: this process (default jax.process_index()).
    process_count: the number of processes (default jax.process_count()).

  Returns:
    An iterator of {'image': float32 [d_steps, B, H, W, C], 'label': int32 [d_steps, B]} with
    B = train.batch_size // process_count, and a `position` int (JSON-serializable).
  """
  data_config = config.data
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  batch_size = config.train.batch_size
  if batch_size % process_count:
    raise ConfigError(f'train.batch_size {batch_size} does not divide over {process_count} '
                      f'processes: set --config.train.batch_size to a multiple of {process_count}')
  check_source(data_config)
  local_batch = batch_size // process_count
  base_seed = _derive_seed(seed, process_index)
  source = _create_source(data_config, base_seed, process_index, process_count)
  if source.num_examples < local_batch:
    raise ConfigError(
        f'{source.num_examples} {data_config.name} images per process ({process_count} '
        f'processes) is fewer than one local batch of {local_batch}: add images or set '
        f'--config.train.batch_size to at most {source.num_examples * process_count}')
  return TrainIterator(source, data_config, base_seed, local_batch * config.train.d_steps,
                       config.train.d_steps, int(position or 0))
