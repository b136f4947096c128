"""The data sources: where the images of `data.name` come from, each read by index or as a stream.

- 'fashion_mnist': the IDX files (Debian's dataset-fashion-mnist, or `data.fashion_mnist_dir`);
- 'folder': a folder of images, one subfolder per class (`data.folder_dir`);
- 'imagenet2012', 'cifar10': prepared tfds sets, never downloaded.

`create_source` gives one process's share of a split as records with positions (the input
pipeline's module doc says how positions make the stream resumable); `check_source` says, naming
the fix, when the configured data cannot be read; `class_names` what the labels mean.
`max_examples` (data.max_examples, for the training stream) keeps a fixed subset of the split, the
same on every epoch. A new data set is a source here plus its name in config_check.DATA_SOURCES;
sagan_jax.input_pipeline decodes, resizes and batches every source alike.
"""

import functools
import gzip
import os
import struct
from typing import Dict, List, Optional, Tuple

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from sagan_jax import config_check
from sagan_jax.errors import ConfigError
from sagan_jax.errors import first_line

FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                         'Sneaker', 'Bag', 'Ankle boot')
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
                   'truck')
TFDS_NAMES = config_check.TFDS_SOURCES
SOURCES = config_check.DATA_SOURCES
# What tf.io.decode_image reads; other files in class folders are ignored.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp')
FOLDER_LAYOUTS = 'root/class/image.jpg or root/<data.split>/class/image.jpg'


@functools.lru_cache(maxsize=None)
def keep_tensorflow_off_gpus() -> None:
  """Hides the GPUs from TensorFlow (once per process; later calls do nothing).

  tf.data runs on the host only, and TensorFlow's runtime, once started, would reserve most of
  each GPU's memory: the memory of the GPUs that JAX trains on. So every function that checks the
  data or builds a tf.data pipeline calls this first, before TensorFlow's runtime starts (a
  TensorBoard writer starts it too: the training loop checks the data before it makes one).
  Hiding them at import time instead made importing this module a global side effect.
  """
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError as e:  # TensorFlow's runtime has started: too late to hide them.
    logging.warning('TensorFlow started before the input pipeline could hide the GPUs from it '
                    '(%s): it may hold GPU memory that JAX needs', e)


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
    # launch/prepare_tfds.sh uses tfds's Python API: `tfds build` would also want apache-beam.
    how = ('ImageNet needs a manual download: put ILSVRC2012_img_train.tar and '
           'ILSVRC2012_img_val.tar in a folder and run `launch/prepare_tfds.sh '
           '--dataset=imagenet2012 --manual-dir=<folder> --data-dir=<data_dir>`'
           if data_config.name == 'imagenet2012' else
           f'run `launch/prepare_tfds.sh --dataset={data_config.name} --data-dir=<data_dir>` on '
           'a machine with internet')
    raise ConfigError(
        f"tfds data set '{data_config.name}' is not prepared in {builder.data_dir}: {how}, then "
        f'set --config.data.tfds_data_dir=<data_dir> (this code never downloads)')
  _split_ranges(builder, data_config.split)
  _check_num_classes(builder.info.features['label'].num_classes, data_config)


def _split_ranges(builder, split: str, share=None):
  """The absolute record ranges of `split` (or of `share` of it); ConfigError unless one range."""
  try:
    share = tfds.core.ReadInstruction.from_spec(split) if share is None else share
    ranges = share.to_absolute(builder.info.splits)
  except (ValueError, KeyError, AssertionError) as e:
    raise ConfigError(f'data.split={split!r} cannot be read from {builder.name} ({first_line(e)}):'
                      f' set --config.data.split to one of {sorted(builder.info.splits)} or a '
                      "slice of one (e.g. 'train[:90%]')") from e
  if len(ranges) != 1:
    raise ConfigError(f'data.split={split!r} names several splits: use one split or a slice of '
                      "one (e.g. 'train' or 'train[:90%]')")
  return ranges


def _absolute_range(builder, split: str, share=None) -> Tuple[str, int, int]:
  """(split name, first record, end) of `split` (or of `share` of it)."""
  ranges = _split_ranges(builder, split, share)
  name, start, end = ranges[0].splitname, ranges[0].from_ or 0, ranges[0].to
  return name, start, builder.info.splits[name].num_examples if end is None else end


def split_size(data_config) -> int:
  """The number of examples in the configured split (all processes)."""
  if data_config.name == 'fashion_mnist':
    return len(_read_idx(_fashion_mnist_paths(data_config.fashion_mnist_dir,
                                              data_config.split)[1]))
  if data_config.name == 'folder':
    return len(list_image_folder(data_config.folder_dir, data_config.split)[0])
  builder = tfds.builder(data_config.name, data_dir=data_config.tfds_data_dir)
  _, start, end = _absolute_range(builder, data_config.split)
  return end - start


def check_max_examples(max_examples: Optional[int], size: int, data_config) -> int:
  """`max_examples` as an int (0: all); ConfigError when negative or beyond the split's `size`."""
  max_examples = int(max_examples or 0)
  if not 0 <= max_examples <= size:
    raise ConfigError(f'data.max_examples={max_examples} but the {data_config.name} split '
                      f"'{data_config.split}' holds {size} examples: set --config.data."
                      f'max_examples to at most {size}, or 0 for all of them')
  return max_examples


def subset_indices(size: int, max_examples: int) -> np.ndarray:
  """The examples of an indexed split that data.max_examples keeps: the first `max_examples` of a
  fixed permutation (seed 0, whatever the run's seed: every run trains on the same subset;
  classes mixed even where the split is sorted by class, as image folders are)."""
  return np.random.default_rng(0).permutation(size)[:max_examples]


def _check_num_classes(num_classes: int, data_config) -> None:
  if num_classes > data_config.num_classes:
    raise ConfigError(f'{data_config.name} has {num_classes} classes but data.num_classes is '
                      f'{data_config.num_classes}: set --config.data.num_classes={num_classes}')


def check_source(data_config) -> None:
  """Raises ConfigError, naming the fix, when the configured data cannot be read."""
  keep_tensorflow_off_gpus()
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
  if data_config.get('max_examples'):
    check_max_examples(data_config.max_examples, split_size(data_config), data_config)


def class_names(data_config) -> Optional[List[str]]:
  """The name of each label of the configured data, or None when unknown.

  Fashion-MNIST and CIFAR-10: their 10 names; a folder: its class folders; other tfds sets: the
  label feature's names from the builder's info (read from the code or the prepared data, never
  downloaded). Unreadable data gives None: naming classes is never worth an error.
  """
  if data_config.name == 'fashion_mnist':
    return list(FASHION_MNIST_CLASSES)
  if data_config.name == 'cifar10':
    return list(CIFAR10_CLASSES)
  try:
    if data_config.name == 'folder':
      return list(list_image_folder(data_config.folder_dir, data_config.split)[2])
    if data_config.name in TFDS_NAMES:
      # tfds.builder reads no data and downloads nothing (only download_and_prepare would).
      builder = tfds.builder(data_config.name, data_dir=data_config.tfds_data_dir)
      names = list(builder.info.features['label'].names)
      # A ClassLabel without names calls its labels '0', '1', ...: no names.
      return None if names == [str(i) for i in range(len(names))] else names
  except Exception as e:  # pylint: disable=broad-except
    logging.info('No class names for %s: %s', data_config.name, first_line(e))
  return None


def derive_seed(*numbers: int) -> int:
  """A 32-bit seed that depends on every number (seed, process, epoch, ...)."""
  return int(np.random.SeedSequence([n % 2**64 for n in numbers]).generate_state(1)[0])


class IndexedSource:
  """Records held as arrays (file paths or images): each epoch is a seeded index permutation."""

  def __init__(self, fields: Dict[str, np.ndarray], base_seed: int):
    self._fields, self._base_seed = fields, base_seed
    self.num_examples = len(fields['label'])

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng(derive_seed(self._base_seed, epoch)).permutation(
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


_no_autograph = tf.autograph.experimental.do_not_convert


class TfdsSource:
  """A prepared tfds set read by position, so that resuming reads at most one block.

  This process's share of the split is cut into blocks of `data.shuffle_buffer` consecutive records
  (tfds wrote the records in a shuffled order). Each epoch takes the blocks in a seeded order and
  each block in a seeded permutation (a shuffle buffer the size of the block, filled from its
  TFRecord files read side by side). An offset in the epoch names a block and a place in it:
  resuming reads that block alone (as a fresh start fills its buffer), whatever the position in
  the epoch; nothing before it is read.
  """

  def __init__(self, data_config, base_seed: int, process_index: int, process_count: int,
               max_examples: int = 0):
    builder = tfds.builder(data_config.name, data_dir=data_config.tfds_data_dir)
    split = data_config.split
    if max_examples:  # The split's first max_examples records (in tfds's shuffled order).
      name, start, _ = _absolute_range(builder, split)
      split = f'{name}[{start}:{start + max_examples}]'
    share = tfds.split_for_jax_process(split, process_index=process_index,
                                       process_count=process_count, drop_remainder=True)
    name, start, end = _absolute_range(builder, split, share)
    size = max(1, int(data_config.shuffle_buffer))
    self._name, self._features, self._base_seed = builder.name, builder.info.features, base_seed
    self.num_examples = end - start
    self._blocks = [builder.info.splits[f'{name}[{a}:{min(a + size, end)}]'].file_instructions
                    for a in range(start, end, size)]
    self._block_sizes = np.array([min(size, end - a) for a in range(start, end, size)])

  def _read_block(self, block: Dict[str, tf.Tensor]) -> tf.data.Dataset:
    """One block's serialized records in its seeded permutation."""
    files = tf.data.Dataset.from_tensor_slices((block['files'], block['skips'], block['takes']))
    records = files.interleave(
        _no_autograph(lambda path, skip, take: tf.data.TFRecordDataset(path).skip(skip).take(take)),
        cycle_length=4, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return records.shuffle(block['size'], seed=block['seed'], reshuffle_each_iteration=False)

  def records(self, epoch: int, offset: int) -> tf.data.Dataset:
    """The epoch's records from `offset` on (the block holding it is read, the rest skipped)."""
    order = np.random.default_rng(derive_seed(self._base_seed, epoch)).permutation(
        len(self._blocks))
    ends = np.cumsum(self._block_sizes[order])
    first = int(np.searchsorted(ends, offset, side='right'))
    within = offset - (int(ends[first - 1]) if first else 0)
    order = order[first:]
    longest = max(len(self._blocks[b]) for b in order)
    padded = lambda field, fill: [[getattr(f, field) for f in self._blocks[b]] + [fill] * (
        longest - len(self._blocks[b])) for b in order]
    blocks = tf.data.Dataset.from_tensor_slices({
        'files': padded('filename', ''), 'skips': np.array(padded('skip', 0), np.int64),
        'takes': np.array(padded('take', 0), np.int64),
        'size': self._block_sizes[order].astype(np.int64),
        'seed': np.array([derive_seed(self._base_seed, epoch, int(b)) for b in order], np.int64)})
    # Files padded with '' are taken 0 records of: interleave never opens them.
    used = lambda b: {k: tf.boolean_mask(b[k], b['takes'] > 0) for k in ('files', 'skips', 'takes')}
    blocks = blocks.map(_no_autograph(lambda b: {**b, **used(b)}))
    ds = blocks.flat_map(_no_autograph(self._read_block)).skip(within)
    decoders = {'image': tfds.decode.SkipDecoding()}

    def deserialize(raw):
      example = self._features.deserialize_example(raw, decoders=decoders)
      return {'encoded': example['image'], 'label': example['label']}

    ds = ds.map(_no_autograph(deserialize), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    return ds.enumerate(start=epoch * self.num_examples + offset).map(
        _no_autograph(lambda pos, ex: {**ex, 'pos': pos}))

  def describe(self, pos: int) -> str:
    return f'{self._name} record {pos}'


def create_source(data_config, base_seed: int, process_index: int, process_count: int,
                  max_examples: Optional[int] = None):
  """This process's share of the data, evenly split over processes (the remainder is dropped).

  Records come from `records(epoch, offset)` as a tf.data.Dataset with positions 'pos';
  `num_examples` is the share's size. `max_examples` (0 or None: all) keeps that many examples of
  the split before it is shared out: tfds sets their first records, indexed sources
  `subset_indices`. It is an argument, not read from `data_config`: only the training stream
  takes a subset.
  """
  keep_tensorflow_off_gpus()
  if max_examples:
    max_examples = check_max_examples(max_examples, split_size(data_config), data_config)
  if data_config.name in TFDS_NAMES:
    return TfdsSource(data_config, base_seed, process_index, process_count, max_examples or 0)
  if data_config.name == 'folder':
    paths, labels, _ = list_image_folder(data_config.folder_dir, data_config.split)
    fields = {'path': np.array(paths), 'label': np.array(labels, np.int32)}
  else:
    images, labels = load_fashion_mnist(data_config.fashion_mnist_dir, data_config.split)
    fields = {'image': images, 'label': labels}
  if max_examples:
    kept = subset_indices(len(fields['label']), max_examples)
    fields = {k: v[kept] for k, v in fields.items()}
  # Strided: sorted folders are grouped by class, and every process should see every class.
  used = len(fields['label']) // process_count * process_count
  return IndexedSource({k: v[process_index:used:process_count] for k, v in fields.items()},
                       base_seed)
