"""tf.data input pipelines: the training stream with an exactly resumable position, and eval passes.

The sources (`data.name`: Fashion-MNIST's IDX files, image folders, prepared tfds sets) live in
sagan_jax.data_sources; here every source's records are decoded, brought to the configured
resolution and channels, scaled to [-1, 1] and batched.
- `create_train_iterator`: the endless, shuffled training stream of one process, {'image': float32
  [d_steps, B, H, W, C] in [-1, 1], 'label': int32 [d_steps, B]}, B = this process's share of the
  global batch.
- `create_eval_iterator`: real images for reference statistics and the classifier, read by one
  process: a finite pass, {'image': float32 [b, H, W, C] in [-1, 1], 'label': int32 [b]}.

Position. Each process numbers the examples it reads: `pos` counts its records across epochs
(epoch = pos // n, offset = pos % n, n = its share of the data). Every epoch's order is fixed by
(seed, process, epoch) and random flips by (seed, process, pos), so the stream is a function of
the seed alone. `it.position` is the int after the last record returned; an iterator created with
`position=it.position` yields exactly (bit for bit) the batches the old one would have yielded
next. Unreadable images are skipped (and logged) at the same records again, so they do not shift
the stream.

Cost of resuming. Folders and IDX files are read by index: resuming costs nothing. A tfds set is
read in blocks of `data.shuffle_buffer` records (data_sources.TfdsSource): resuming reads the one
block that holds the position, as a fresh start does, so the time to the first batch does not
grow with the position in the epoch.

TensorFlow is imported by the data layer only, so models and the train step do not need it.
"""

import os
from typing import Dict, Optional

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from sagan_jax import data_sources
from sagan_jax.errors import ConfigError


def check_source(data_config) -> None:
  """Raises ConfigError, naming the fix, when the configured data cannot be read."""
  data_sources.check_source(data_config)


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


def _jpeg_square(encoded: tf.Tensor, resolution: int, downscale: bool) -> tf.Tensor:
  """The centred square of a JPEG, decoded alone (decode_and_crop_jpeg).

  With `downscale`, libjpeg decodes at 1/2, 1/4 or 1/8 scale (DCT scaling) when the square stays
  at least `resolution` px: most of a large image's decoding cost goes, and the area resize that
  follows has less to average.
  """
  shape = tf.io.extract_jpeg_shape(encoded)
  side = tf.minimum(shape[0], shape[1])

  def decode(ratio):
    def fn():
      height, width = -(-shape[0] // ratio), -(-shape[1] // ratio)  # libjpeg rounds up.
      square = tf.minimum(height, width)
      window = tf.stack([(height - square) // 2, (width - square) // 2, square, square])
      return tf.io.decode_and_crop_jpeg(encoded, window, channels=0, ratio=ratio)
    return fn

  ratios = (1, 2, 4, 8) if downscale else (1,)
  index = tf.add_n([tf.cast(side // r >= resolution, tf.int32) for r in ratios[1:]] +
                   [tf.constant(0)])
  return tf.switch_case(index, [decode(r) for r in ratios])


def _decode(example: Dict[str, tf.Tensor], data_config) -> Dict[str, tf.Tensor]:
  """A record ('path', 'encoded' bytes or an 'image' array) -> uint8 image; raises if corrupt.

  JPEGs are cropped to their centred square while decoding (`_jpeg_square`); other formats are
  decoded whole and cropped by `_to_resolution`.
  """
  channels = data_config.channels
  if 'image' in example:
    image = example['image']
  else:
    encoded = tf.io.read_file(example['path']) if 'path' in example else example['encoded']
    downscale = data_config.get('jpeg_downscale', True)
    image = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: _jpeg_square(encoded, data_config.resolution, downscale),
        lambda: tf.io.decode_image(encoded, channels=0, dtype=tf.uint8, expand_animations=False))
  return {'image': _to_channels(image, channels), 'label': tf.cast(example['label'], tf.int32),
          'pos': example['pos']}


def _to_resolution(image: tf.Tensor, resolution: int) -> tf.Tensor:
  """Centre crop to the short side, then area resize to `resolution` (padding 28 px to 32 px)."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]

  def crop_and_resize(square=None):
    if square is None:
      side = tf.minimum(height, width)
      square = tf.image.crop_to_bounding_box(image, (height - side) // 2, (width - side) // 2,
                                             side, side)
    return tf.image.resize(square, (resolution, resolution), method='area')

  if resolution > 32:
    return crop_and_resize()
  # MNIST-style 28 px images: pad with the background instead of blurring them up; below 32 px
  # (progressive growing's first stages) the padded image is area-resized, so every stage frames
  # the garment as the 32 px images do.
  padded = lambda: tf.pad(image, [[2, 2], [2, 2], [0, 0]])
  return tf.cond((height == 28) & (width == 28),
                 padded if resolution == 32 else lambda: crop_and_resize(padded()),
                 crop_and_resize)


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


def host_cores() -> int:
  """The CPU cores this process may run on (the pipeline's threads, one per core)."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # Not Linux.
    return os.cpu_count() or 1


def _options() -> tf.data.Options:
  """The pipeline's own thread pool, one per host core, each op single-threaded inside: tf.data's
  advice for input pipelines (no oversubscription); autotuned parallelism and buffers."""
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = True
  options.threading.private_threadpool_size = host_cores()
  options.threading.max_intra_op_parallelism = 1
  return options


class _Stream:
  """The endless stream of one process in batches of `unit` examples (module doc: position).

  Each epoch is its own tf.data pipeline (records -> parallel decode -> skip unreadable ->
  parallel preprocess -> batch -> prefetch); the first batch of an epoch is completed with the
  last examples of the previous one, so batches run across epoch boundaries.
  """

  def __init__(self, source, data_config, base_seed: int, unit: int, position: int):
    self._source, self._config, self._base_seed = source, data_config, base_seed
    self.epoch_size = source.num_examples  # This process's records per epoch.
    self._unit = unit
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
    def load(example):  # Decode, crop, resize, flip: one parallel map.
      example = _decode(example, data_config)
      seed = tf.stack([tf.constant(base_seed, tf.int64), example['pos']])
      return preprocess({**example, 'seed': seed}, data_config)

    ds = self._source.records(self._epoch, self._offset)
    # In order (deterministic): the stream must replay exactly. Corrupt images raise in `load`
    # and are dropped by ignore_errors; the gap in 'pos' counts them.
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    if front:
      res, channels = data_config.resolution, data_config.channels
      filler = {'image': tf.zeros((res, res, channels)), 'label': tf.constant(0, tf.int32),
                'pos': tf.constant(-1, tf.int64)}
      ds = tf.data.Dataset.from_tensors(filler).repeat(front).concatenate(ds)
    return ds.batch(self._unit).prefetch(2).with_options(_options()).as_numpy_iterator()

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
    """The next batch of `unit` examples, flat."""
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
    return batch


class TrainIterator(_Stream):
  """The endless training stream of one process; `position` says where it stands (module doc).

  Each batch of `unit` examples is split into `d_steps` batches, one per D step.
  """

  def __init__(self, source, data_config, base_seed: int, unit: int, d_steps: int,
               position: int):
    super().__init__(source, data_config, base_seed, unit, position)
    self._d_steps = d_steps

  def __next__(self) -> Dict[str, np.ndarray]:
    batch = super().__next__()
    return {k: v.reshape((self._d_steps, -1) + v.shape[1:]) for k, v in batch.items()}


def create_train_iterator(config, seed: int, position: Optional[int] = None,
                          process_index: Optional[int] = None,
                          process_count: Optional[int] = None,
                          resolution: Optional[int] = None) -> TrainIterator:
  """The endless, shuffled training stream of one process, batched as the train step wants.

  Args:
    config: the full config (`data`, `train.batch_size` global, `train.d_steps`).
    seed: seeds the data order and the flips; keep it fixed across resumes (and
      data.max_examples: positions count the examples of the subset).
    position: `it.position` of an earlier iterator with the same config and seed, to continue
      exactly where it stood; None or 0 starts at the beginning.
    process_index: this process (default jax.process_index()).
    process_count: the number of processes (default jax.process_count()).
    resolution: the size of the images (default data.resolution): a stage of progressive
      growing. The stream (order, flips, positions) does not depend on it.

  Returns:
    An iterator of {'image': float32 [d_steps, B, H, W, C], 'label': int32 [d_steps, B]} with
    B = train.batch_size // process_count, and a `position` int (JSON-serializable).
  """
  data_config = config.data
  if resolution is not None:
    data_config = _with_fields(data_config, resolution=resolution)
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  batch_size = config.train.batch_size
  if batch_size % process_count:
    raise ConfigError(f'train.batch_size {batch_size} does not divide over {process_count} '
                      f'processes: set --config.train.batch_size to a multiple of {process_count}')
  data_sources.check_source(data_config)
  local_batch = batch_size // process_count
  base_seed = data_sources.derive_seed(seed, process_index)
  source = data_sources.create_source(data_config, base_seed, process_index, process_count,
                                      data_config.get('max_examples'))
  if source.num_examples < local_batch:
    raise ConfigError(
        f'{source.num_examples} {data_config.name} images per process ({process_count} '
        f'processes) is fewer than one local batch of {local_batch}: add images (or raise '
        f'--config.data.max_examples) or set --config.train.batch_size to at most '
        f'{source.num_examples * process_count}')
  return TrainIterator(source, data_config, base_seed, local_batch * config.train.d_steps,
                       config.train.d_steps, int(position or 0))


class EvalIterator:
  """Batches of real images read by one process; see create_eval_iterator.

  Attributes:
    num_examples: the number of images it yields in all (None: endless).
    dataset_size: the number of images in the split.
    batch_size: images per batch (the last one may hold fewer).
  """

  def __init__(self, stream: _Stream, num_examples: Optional[int], dataset_size: int,
               batch_size: int):
    self._stream, self._left = stream, num_examples
    self.num_examples, self.dataset_size, self.batch_size = num_examples, dataset_size, batch_size

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    if self._left is not None and self._left <= 0:
      raise StopIteration
    batch = next(self._stream)
    if self._left is not None:
      count = min(self._left, self.batch_size)
      self._left -= count
      batch = {k: v[:count] for k, v in batch.items()}
    return batch


def _with_fields(data_config, **fields) -> ml_collections.ConfigDict:
  """A copy of `data_config` with `fields` replaced (the original stays as it is)."""
  copy = ml_collections.ConfigDict(data_config.to_dict())
  for name, value in fields.items():
    copy[name] = value
  return copy


def create_eval_iterator(data_config, batch_size: int, split: Optional[str] = None,
                         num_examples: Optional[int] = None, *, seed: int = 0,
                         random_flip: bool = False, repeat: bool = False) -> EvalIterator:
  """Real images of a split, read whole by this process: reference statistics, the classifier.

  A finite pass by default: `num_examples` images (None: all of the split; never more), each once,
  in an order shuffled by `seed`, so that fewer than all are a random subset. The images are the
  training stream's (the same decoding, resolution, channels and positions; process 0 of 1 with
  `seed`; JPEGs decoded at full size), flips off unless `random_flip`. With `repeat` the stream goes
  on over reshuffled epochs (as training reads them) for `num_examples` images, endless when None:
  for training on it. An unreadable image is skipped and the next one of the stream takes its place.

  Args:
    data_config: the `data` part of a training config.
    batch_size: images per batch (at most the split's size, or the images of a finite pass).
    split: the split to read (default data_config.split).
    num_examples: how many images in all (default: the split's size; endless with `repeat`).
    seed: seeds the order (and flips); the same seed reads the same images in the same order.
    random_flip: flip images at random, as training does (seeded by `seed` and the position).
    repeat: go on past the end of the split (into the next, reshuffled epoch).

  Returns:
    An EvalIterator of {'image': float32 [b, H, W, C] in [-1, 1], 'label': int32 [b]}, b =
    batch_size but in the last batch; its `num_examples` and `dataset_size` say how many images it
    yields and the split holds.
  """
  # Full-size JPEG decoding: reference statistics resize real images the usual way (FID is
  # sensitive to how images are resized).
  # The whole split, whatever data.max_examples (the training stream's subset) says.
  fields = {'random_flip': random_flip, 'jpeg_downscale': False, 'max_examples': 0,
            **({'split': split} if split is not None else {})}
  data_config = _with_fields(data_config, **fields)
  data_sources.check_source(data_config)
  base_seed = data_sources.derive_seed(seed, 0)
  source = data_sources.create_source(data_config, base_seed, process_index=0, process_count=1)
  size = source.num_examples
  if not repeat:
    num_examples = size if num_examples is None else min(num_examples, size)
  batch_size = min(batch_size, size if repeat else num_examples)
  return EvalIterator(_Stream(source, data_config, base_seed, batch_size, 0), num_examples, size,
                      batch_size)
