"""Input pipelines: sources, conversions, per-process splits, exact resume, clear errors."""

import logging
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from sagan_jax import data_sources
from sagan_jax import input_pipeline
from sagan_jax.errors import ConfigError
from tests import tolerances
from tests.conftest import tiny_config

TFDS_EXAMPLES = 12  # Examples of the mocked tfds 'train' splits.


def _save(path, array, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(array, np.uint8), mode).save(path)


def _corrupt(path, data=b'not an image at all'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def _folder_config(folder, batch_size, *, resolution=4, channels=3, num_classes=10, d_steps=1,
                   random_flip=False):
  config = tiny_config()
  config.data.name, config.data.folder_dir = 'folder', str(folder)
  config.data.resolution, config.data.channels = resolution, channels
  config.data.num_classes, config.data.random_flip = num_classes, random_flip
  config.train.batch_size, config.train.d_steps = batch_size, d_steps
  return config


def _take(iterator, num_batches):
  return [next(iterator) for _ in range(num_batches)]


def _assert_same_batches(expected, actual):
  assert len(expected) == len(actual)
  for want, got in zip(expected, actual):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


def _area_resize(image, resolution):
  """Centre crop to the short side and block-average (an integer factor), independently of TF."""
  height, width = image.shape[:2]
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  crop = image[top:top + side, left:left + side].astype(np.float64)
  f = side // resolution
  return crop.reshape(resolution, f, resolution, f, -1).mean(axis=(1, 3)) / 127.5 - 1.0


def test_load_fashion_mnist_reads_idx_files(fake_fashion_mnist_dir):
  images, labels = data_sources.load_fashion_mnist(fake_fashion_mnist_dir, 'train')
  assert images.shape == (64, 28, 28, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.arange(64) % 10)
  assert images[3, 6, 4, 0] == 255 and images[3, 20, 4, 0] < 30  # Class 3's square at rows 6-13.


def test_train_batches_are_padded_scaled_and_seeded(fake_fashion_mnist_dir):
  config = tiny_config(fake_fashion_mnist_dir)
  config.train.d_steps = 2
  iterator = input_pipeline.create_train_iterator(config, seed=0)
  batch = next(iterator)
  assert batch['image'].shape == (2, 8, 32, 32, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (2, 8) and batch['label'].dtype == np.int32
  assert batch['image'].min() >= -1.0 and batch['image'].max() == 1.0
  assert iterator.position == 16 and isinstance(iterator.position, int)
  # 28 px images are padded by 2 px of background (0 -> -1) to 32 px.
  np.testing.assert_array_equal(batch['image'][:, :, :2], -1.0)
  np.testing.assert_array_equal(batch['image'][:, :, :, -2:], -1.0)
  again = next(input_pipeline.create_train_iterator(config, seed=0))
  other = next(input_pipeline.create_train_iterator(config, seed=1))
  np.testing.assert_array_equal(batch['image'], again['image'])
  assert not np.array_equal(batch['label'], other['label'])
  # Two processes read disjoint halves of the 64 examples (one epoch: 4 batches of 8).
  halves = []
  for index in range(2):
    it = input_pipeline.create_train_iterator(config, seed=0, process_index=index,
                                              process_count=2)
    images = np.concatenate([b['image'].reshape(-1, 32 * 32) for b in _take(it, 4)])
    halves.append({im.tobytes() for im in images})
    assert len(halves[-1]) == 32 and it.position == 32
  assert not halves[0] & halves[1]


def test_eval_iterator_reads_a_split_once_in_the_training_streams_order(fake_fashion_mnist_dir):
  config = tiny_config(fake_fashion_mnist_dir)
  config.train.d_steps, config.train.batch_size = 1, 16
  config.data.random_flip = False
  # The training stream of one process with the same seed, flips off: the same images in order.
  stream = input_pipeline.create_train_iterator(config, seed=5, process_index=0, process_count=1)
  first = _take(stream, 8)
  expected = {k: np.concatenate([b[k][0] for b in first]) for k in ('image', 'label')}
  assert len(expected['label']) == 128  # Two epochs of the 64 training images.
  for num, batch_size, sizes in ((40, 16, [16, 16, 8]), (None, 30, [30, 30, 4]),
                                 (1000, 64, [64]), (5, 64, [5])):
    iterator = input_pipeline.create_eval_iterator(config.data, batch_size, num_examples=num,
                                                   seed=5)
    batches = list(iterator)
    count = sum(sizes)
    assert [len(b['label']) for b in batches] == sizes and iterator.num_examples == count
    assert iterator.dataset_size == 64 and iterator.batch_size == min(batch_size, count)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([b[key] for b in batches]),
                                    expected[key][:count])
  # Another split, and flips on: the flipped training stream.
  test_split = list(input_pipeline.create_eval_iterator(config.data, 32, 'test'))
  assert [len(b['label']) for b in test_split] == [32]
  np.testing.assert_array_equal(np.sort(test_split[0]['label']), np.sort(np.arange(32) % 10))
  assert config.data.split == 'train' and not config.data.random_flip  # Left as they were.
  config.data.random_flip = True
  flipped = input_pipeline.create_train_iterator(config, seed=5, process_index=0, process_count=1)
  repeated = input_pipeline.create_eval_iterator(config.data, 16, seed=5, random_flip=True,
                                                 repeat=True)
  assert repeated.num_examples is None
  for want, got in zip(_take(flipped, 6), _take(repeated, 6)):  # Across the epoch boundary.
    np.testing.assert_array_equal(want['image'][0], got['image'])
    np.testing.assert_array_equal(want['label'][0], got['label'])


def test_folder_layouts_and_sorted_classes(tmp_path):
  image = np.zeros((4, 4, 3))
  for root in (tmp_path / 'plain', tmp_path / 'image_folder' / 'train'):
    _save(str(root / 'b_cat' / '2.png'), image)
    _save(str(root / 'b_cat' / 'deeper' / '1.jpg'), image)
    _save(str(root / 'a_dog' / '3.PNG'), image)
    _corrupt(str(root / 'a_dog' / 'notes.txt'))
  _save(str(tmp_path / 'image_folder' / 'test' / 'c_cow' / '0.png'), image)
  plain = data_sources.list_image_folder(str(tmp_path / 'plain'), 'train')
  image_folder = data_sources.list_image_folder(str(tmp_path / 'image_folder'), 'train')
  for (paths, labels, classes), root in ((plain, tmp_path / 'plain'),
                                         (image_folder, tmp_path / 'image_folder' / 'train')):
    assert classes == ('a_dog', 'b_cat') and labels == (0, 1, 1)
    assert [os.path.relpath(p, root) for p in paths] == ['a_dog/3.PNG', 'b_cat/2.png',
                                                         'b_cat/deeper/1.jpg']
  _, labels, classes = data_sources.list_image_folder(str(tmp_path / 'image_folder'), 'test')
  assert classes == ('c_cow',) and labels == (0,)


@pytest.fixture(scope='module')
def mixed_folder(tmp_path_factory):
  """One image per class in several colour modes and shapes, and two corrupt files."""
  root = tmp_path_factory.mktemp('mixed')
  rng = np.random.default_rng(0)
  images = {'0_gray': rng.integers(0, 256, (8, 16)),  # Wide: cropped to the middle columns.
            '1_rgba': rng.integers(0, 256, (12, 8, 4)),  # Tall: cropped to the middle rows.
            '2_gray_alpha': rng.integers(0, 256, (8, 8, 2)),
            '3_rgb': rng.integers(0, 256, (4, 4, 3))}
  modes = {'0_gray': 'L', '1_rgba': 'RGBA', '2_gray_alpha': 'LA', '3_rgb': 'RGB'}
  for name, array in images.items():
    _save(str(root / name / 'image.png'), array, modes[name])
  _corrupt(str(root / '4_corrupt' / 'bad.jpg'))
  with open(root / '3_rgb' / 'image.png', 'rb') as f:
    _corrupt(str(root / '4_corrupt' / 'truncated.png'), f.read()[:60])
  return root, images


@pytest.mark.parametrize('channels', [3, 1])
def test_folder_images_are_converted_cropped_resized_and_corrupt_ones_skipped(
    mixed_folder, channels, caplog):
  root, images = mixed_folder
  config = _folder_config(root, batch_size=4, channels=channels)
  iterator = input_pipeline.create_train_iterator(config, seed=0)
  with caplog.at_level(logging.WARNING):
    batch = next(iterator)  # One epoch: the 4 readable images of the 6 files.
  assert sorted(batch['label'][0]) == [0, 1, 2, 3]
  assert iterator.num_skipped == 2 and iterator.position == 6
  assert 'Skipped 2 unreadable image(s) so far' in caplog.text and '4_corrupt' in caplog.text
  for label, image in zip(batch['label'][0], batch['image'][0]):
    source = images[sorted(images)[label]]
    source = source[..., None] if source.ndim == 2 else source
    # Float32 rounding: the area resize averages f x f pixels of at most 255 (weights 1 / f^2,
    # f^2 + 1 roundings), / 127.5 - 1 two more, relative to terms of at most 255 / 127.5 + 1 = 3.
    f = min(source.shape[:2]) // 4
    rounding = tolerances.gamma(f * f + 3) * 3
    if source.shape[-1] in (1, 2):  # Gray (+ alpha): the gray plane, repeated for RGB.
      want, atol = np.repeat(source[..., :1], channels, axis=-1), rounding
    elif channels == 3:  # RGB(A): the colour planes, alpha dropped.
      want, atol = source[..., :3], rounding
    else:
      # ITU-R 601 luma, converted back to uint8 before resizing: tf.image.rgb_to_grayscale
      # truncates luma * 255.5 / 255, which is within (-1, 0.5] level of it; averaging keeps that.
      want = source[..., :3] @ np.array([[0.2989], [0.587], [0.114]])
      atol = 1.0 / 127.5 + rounding
    np.testing.assert_allclose(image, _area_resize(want, 4), rtol=0, atol=atol)


def test_decoded_28px_images_are_padded_to_32(tmp_path):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (28, 28))
  _save(str(tmp_path / 'digit' / 'x.png'), image)
  config = _folder_config(tmp_path, batch_size=1, resolution=32, channels=1)
  batch = next(input_pipeline.create_train_iterator(config, seed=0))
  want = np.pad(image / 127.5 - 1.0, 2, constant_values=-1.0)[..., None]
  # x / 127.5 - 1 in float32: two roundings, relative to terms of at most 2 + 1.
  np.testing.assert_allclose(batch['image'][0, 0], want, rtol=0, atol=tolerances.gamma(2) * 3)


def test_folder_splits_over_processes_are_disjoint_and_cover_the_data(tmp_path):
  for i in range(13):  # Image i is the constant 10 i + 5; 13 over 2 processes drops one.
    _save(str(tmp_path / f'class{i % 3}' / f'{i}.png'), np.full((8, 8), 10 * i + 5))
  config = _folder_config(tmp_path, batch_size=4, channels=1)
  values = []
  for index in range(2):
    it = input_pipeline.create_train_iterator(config, seed=3, process_index=index,
                                              process_count=2)
    stream = np.concatenate([b['image'][0, :, 0, 0, 0] for b in _take(it, 6)])
    stream = np.round((stream + 1.0) * 127.5).astype(int)
    first, second = stream[:6], stream[6:]  # Two epochs of the process's 6 images.
    assert sorted(first) == sorted(second) and len(set(first)) == 6
    assert list(first) != list(second)  # Each epoch has its own order.
    values.append(set(first))
  assert not values[0] & values[1]
  union = values[0] | values[1]
  assert len(union) == 12 and union <= {10 * i + 5 for i in range(13)}


def test_resume_is_exact_across_epochs_with_corrupt_images_and_flips(tmp_path):
  rng = np.random.default_rng(2)
  for i in range(9):
    _save(str(tmp_path / f'c{i}' / 'x.png'), rng.integers(0, 256, (6, 6, 3)))
  _corrupt(str(tmp_path / 'c9' / 'broken.png'))
  config = _folder_config(tmp_path, batch_size=2, d_steps=2, random_flip=True)
  reference = input_pipeline.create_train_iterator(config, seed=7)
  batches, positions = [], [reference.position]
  for _ in range(8):  # 32 examples: 3 epochs of 9 readable images and a bit.
    batches.append(next(reference))
    positions.append(reference.position)
  assert reference.position in (35, 36) and reference.num_skipped == reference.position - 32
  labels = np.concatenate([b['label'].ravel() for b in batches])
  images = np.concatenate([b['image'].reshape(-1, 4, 4, 3) for b in batches])
  for epoch in range(3):
    assert sorted(labels[9 * epoch:9 * epoch + 9]) == list(range(9))
  flipped = [np.array_equal(images[i], images[j][:, ::-1]) and not np.array_equal(
      images[i], images[j]) for i in range(9) for j in np.flatnonzero(labels == labels[i])]
  assert any(flipped)  # The same image appears both ways round.
  for k in (1, 3, 6):  # Positions in the first, second and third epoch.
    resumed = input_pipeline.create_train_iterator(config, seed=7, position=positions[k])
    _assert_same_batches(batches[k:k + 2], _take(resumed, 2))
    assert resumed.position == positions[k + 2]


TFDS_SHARDS = 3  # TFRecord files of the written tfds 'train' splits (4 examples each).


def write_tfds(data_dir, name, examples, shards=TFDS_SHARDS):
  """A prepared tfds set `name` whose 'train' split holds `examples` in `shards` TFRecord files, as
  tfds writes them (launch/prepare_tfds.sh)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=str(data_dir))
  template = tfds.core.ShardedFileTemplate(data_dir=builder.data_path, dataset_name=name,
                                           split='train', filetype_suffix='tfrecord')
  builder.data_path.mkdir(parents=True)
  per_shard = len(examples) // shards
  for shard in range(shards):
    path = template.sharded_filepath(shard_index=shard, num_shards=shards)
    with tf.io.TFRecordWriter(os.fspath(path)) as writer:
      for example in examples[shard * per_shard:(shard + 1) * per_shard]:
        writer.write(builder.info.features.serialize_example(example))
  builder.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name='train', shard_lengths=[per_shard] * shards, num_bytes=0, filename_template=template)]))
  builder.info.write_to_directory(builder.data_path)


@pytest.fixture(scope='module')
def tfds_data_dir(tmp_path_factory):
  """cifar10 and imagenet2012 prepared with tfds's random examples: 12 in 3 files each."""
  data_dir = tmp_path_factory.mktemp('tfds')
  examples = {}
  for name in data_sources.TFDS_NAMES:
    features = tfds.builder(name, data_dir=str(data_dir)).info.features
    examples[name] = list(mocking.RandomFakeGenerator(features, TFDS_EXAMPLES))
    write_tfds(data_dir, name, examples[name])
  return str(data_dir), examples


def _tfds_config(name, data_dir, resolution, batch_size):
  config = tiny_config()
  config.data.name, config.data.tfds_data_dir = name, data_dir
  config.data.resolution, config.data.channels = resolution, 3
  config.data.num_classes = 10 if name == 'cifar10' else 1000
  config.data.random_flip, config.data.shuffle_buffer = False, 8  # Blocks of 8 and 4 records.
  config.train.batch_size = batch_size
  return config


def test_cifar10_gives_its_images_and_resumes_exactly(tfds_data_dir):
  data_dir, examples = tfds_data_dir
  config = _tfds_config('cifar10', data_dir, resolution=32, batch_size=8)
  input_pipeline.check_source(config.data)
  reference = input_pipeline.create_train_iterator(config, seed=0)
  batches = _take(reference, 5)  # 40 examples: 3 epochs of 12 and a bit.
  resumed = input_pipeline.create_train_iterator(config, seed=0, position=16)
  _assert_same_batches(batches[2:], _take(resumed, 3))
  assert reference.position == 40 and resumed.position == 40
  # float32 arithmetic, as the pipeline's: the bytes must match exactly.
  expected = {(ex['image'].astype(np.float32) / np.float32(127.5) - 1).tobytes(): ex['label']
              for ex in examples['cifar10']}
  images = np.concatenate([b['image'][0] for b in batches])
  labels = np.concatenate([b['label'][0] for b in batches])
  for epoch in range(3):  # Every epoch holds each example once, with its label.
    seen = {images[i].tobytes(): labels[i] for i in range(12 * epoch, 12 * epoch + 12)}
    assert seen == expected
  assert not np.array_equal(labels[:12], labels[12:24])  # Reshuffled each epoch.


def test_imagenet2012_crops_resizes_and_resumes_at_any_record(tfds_data_dir):
  data_dir, examples = tfds_data_dir
  config = _tfds_config('imagenet2012', data_dir, resolution=16, batch_size=1)
  input_pipeline.check_source(config.data)
  reference = input_pipeline.create_train_iterator(config, seed=0)
  batches = _take(reference, 14)
  for position in (1, 7, 8, 9, 11, 12):  # In the first block, at block and epoch boundaries.
    resumed = input_pipeline.create_train_iterator(config, seed=0, position=position)
    _assert_same_batches(batches[position:position + 2], _take(resumed, 2))
  images = np.concatenate([b['image'][0] for b in batches])
  labels = np.concatenate([b['label'][0] for b in batches])
  assert images.shape == (14, 16, 16, 3) and images.min() >= -1.0 and images.max() <= 1.0
  assert sorted(labels[:12]) == sorted(ex['label'] for ex in examples['imagenet2012'])


@pytest.mark.parametrize('split,message', [
    ('validation', "data.split='validation' cannot be read.*one of \\['train'\\]"),
    ('train+train', 'names several splits')])
def test_a_tfds_split_that_cannot_be_read_names_the_fix(tfds_data_dir, split, message):
  config = _tfds_config('cifar10', tfds_data_dir[0], resolution=32, batch_size=2)
  config.data.split = split
  with pytest.raises(ConfigError, match=message):
    input_pipeline.check_source(config.data)


def test_two_processes_read_disjoint_halves_of_a_tfds_split(tfds_data_dir):
  data_dir, examples = tfds_data_dir
  config = _tfds_config('cifar10', data_dir, resolution=32, batch_size=2)
  halves = [np.concatenate([b['label'][0] for b in _take(input_pipeline.create_train_iterator(
      config, seed=0, process_index=i, process_count=2), 6)]) for i in range(2)]
  assert sorted(np.concatenate(halves)) == sorted(ex['label'] for ex in examples['cifar10'])


def test_missing_fashion_mnist_names_the_package_and_the_flag(tmp_path):
  config = tiny_config(str(tmp_path / 'nowhere'))
  with pytest.raises(ConfigError) as error:
    input_pipeline.check_source(config.data)
  assert 'apt-get install dataset-fashion-mnist' in str(error.value)
  assert '--config.data.fashion_mnist_dir' in str(error.value)


@pytest.mark.parametrize('name,fix', [
    ('cifar10', 'launch/prepare_tfds.sh --dataset=cifar10 --data-dir=<data_dir>'),
    ('imagenet2012', 'launch/prepare_tfds.sh --dataset=imagenet2012 --manual-dir=<folder>')])
def test_unprepared_tfds_data_never_downloads(tmp_path, name, fix):
  config = tiny_config()
  config.data.name = name
  config.data.tfds_data_dir = str(tmp_path)
  with pytest.raises(ConfigError, match='is not prepared') as error:
    input_pipeline.check_source(config.data)
  assert fix in str(error.value) and '--config.data.tfds_data_dir' in str(error.value)
  assert os.listdir(tmp_path) == []  # Nothing was fetched or created.
  with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'README.md')) as f:
    assert f'launch/prepare_tfds.sh --dataset={name}' in f.read()  # README gives the same advice.


def test_unknown_data_name():
  config = tiny_config()
  config.data.name = 'mnist'
  with pytest.raises(ConfigError, match="unknown data.name 'mnist'.*--config.data.name"):
    input_pipeline.check_source(config.data)


@pytest.mark.parametrize('case,message', [
    ('too_few', r'3 folder images per process \(2 processes\) is fewer than one local batch of '
                r'4: .* --config.train.batch_size to at most 6'),
    ('indivisible', 'train.batch_size 5 does not divide over 2 processes: set '
                    '--config.train.batch_size to a multiple of 2'),
    ('no_images', 'no images .* in class subfolders of .*--config.data.folder_dir'),
    ('missing', "image folder '.*nowhere' does not exist: set --config.data.folder_dir"),
    ('classes', 'folder has 3 classes but data.num_classes is 2: set '
                '--config.data.num_classes=3'),
])
def test_bad_folder_input_is_one_config_error_naming_the_fix(tmp_path, case, message):
  for i in range(7 if case != 'no_images' else 0):
    _save(str(tmp_path / f'c{i % 3}' / f'{i}.png'), np.zeros((4, 4)))
  _corrupt(str(tmp_path / 'c0' / 'readme.txt'))
  config = _folder_config(tmp_path, batch_size=5 if case == 'indivisible' else 8,
                          num_classes=2 if case == 'classes' else 10)
  if case == 'missing':
    config.data.folder_dir = str(tmp_path / 'nowhere')
  with pytest.raises(ConfigError, match=message) as error:
    input_pipeline.create_train_iterator(config, seed=0, process_index=0, process_count=2)
  assert '\n' not in str(error.value)


def test_a_folder_of_only_corrupt_images_stops_with_a_config_error(tmp_path):
  for i in range(2):
    _corrupt(str(tmp_path / 'c' / f'{i}.jpg'))
  config = _folder_config(tmp_path, batch_size=1)
  iterator = input_pipeline.create_train_iterator(config, seed=0)
  with pytest.raises(ConfigError, match='no readable image in a whole epoch'):
    next(iterator)


def _image_bytes(batches, count):
  return [image.tobytes() for b in batches for image in b['image'][0]][:count]


def test_max_examples_trains_on_one_fixed_subset_every_epoch_and_resumes(fake_fashion_mnist_dir):
  config = tiny_config(fake_fashion_mnist_dir)
  config.data.max_examples, config.data.random_flip = 20, False
  iterator = input_pipeline.create_train_iterator(config, seed=0)
  assert iterator.epoch_size == 20
  batches = _take(iterator, 5)  # 40 examples: two epochs of the 20.
  images, labels = data_sources.load_fashion_mnist(fake_fashion_mnist_dir)
  kept = data_sources.subset_indices(64, 20)
  padded = np.pad(images[kept], [(0, 0), (2, 2), (2, 2), (0, 0)]).astype(np.float32)
  expected = {image.tobytes() for image in padded / np.float32(127.5) - 1}
  seen = _image_bytes(batches, 40)
  assert set(seen[:20]) == expected and set(seen[20:]) == expected and seen[:20] != seen[20:]
  assert len(set(labels[kept])) > 5  # Classes mixed.
  other_seed = _image_bytes(_take(input_pipeline.create_train_iterator(config, seed=1), 3), 20)
  assert set(other_seed) == expected  # The subset does not depend on the run's seed.
  resumed = input_pipeline.create_train_iterator(config, seed=0, position=16)
  _assert_same_batches(batches[2:], _take(resumed, 3))
  shares = [_image_bytes(_take(input_pipeline.create_train_iterator(
      config, seed=0, process_index=i, process_count=2), 5), 10) for i in range(2)]
  assert set(shares[0]) | set(shares[1]) == expected and not set(shares[0]) & set(shares[1])
  # Reference statistics and the classifier read the whole split.
  assert input_pipeline.create_eval_iterator(config.data, 8).dataset_size == 64


def test_max_examples_beyond_the_split_names_the_fix(fake_fashion_mnist_dir):
  config = tiny_config(fake_fashion_mnist_dir)
  config.data.max_examples = 65
  message = ("data.max_examples=65 but the fashion_mnist split 'train' holds 64 examples: set "
             '--config.data.max_examples to at most 64')
  with pytest.raises(ConfigError, match=message):
    input_pipeline.check_source(config.data)
  with pytest.raises(ConfigError, match=message):
    input_pipeline.create_train_iterator(config, seed=0)
  config.data.max_examples = 4  # Fewer than one batch of 8.
  with pytest.raises(ConfigError, match='fewer than one local batch.*data.max_examples'):
    input_pipeline.create_train_iterator(config, seed=0)


def test_max_examples_of_a_tfds_split_are_its_first_records(tfds_data_dir):
  data_dir, examples = tfds_data_dir
  config = _tfds_config('cifar10', data_dir, resolution=32, batch_size=5)
  config.data.max_examples = 5
  input_pipeline.check_source(config.data)
  scaled = [(ex['image'].astype(np.float32) / np.float32(127.5) - 1).tobytes()
            for ex in examples['cifar10']]
  expected = set(scaled[:5])
  iterator = input_pipeline.create_train_iterator(config, seed=0)
  assert iterator.epoch_size == 5
  assert [set(_image_bytes([batch], 5)) for batch in _take(iterator, 2)] == [expected] * 2
  config.data.max_examples, config.train.batch_size = 6, 2  # Two processes share the first 6.
  shares = [_image_bytes(_take(input_pipeline.create_train_iterator(
      config, seed=0, process_index=i, process_count=2), 3), 3) for i in range(2)]
  assert set(shares[0] + shares[1]) == set(scaled[:6]) and not set(shares[0]) & set(shares[1])
  config.data.max_examples = TFDS_EXAMPLES + 1
  with pytest.raises(ConfigError, match=f'holds {TFDS_EXAMPLES} examples'):
    input_pipeline.check_source(config.data)
