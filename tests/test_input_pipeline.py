"""Input pipelines: IDX files, batches as the train step wants them, clear errors, no downloads."""

import os

import numpy as np
import pytest

from sagan_jax import input_pipeline
from sagan_jax.errors import ConfigError
from tests.conftest import tiny_config


def test_load_fashion_mnist_reads_idx_files(fake_fashion_mnist_dir):
  images, labels = input_pipeline.load_fashion_mnist(fake_fashion_mnist_dir, 'train')
  assert images.shape == (64, 28, 28, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.arange(64) % 10)
  assert images[3, 6, 4, 0] == 255 and images[3, 20, 4, 0] < 30  # Class 3's square at rows 6-13.


def test_train_batches_are_padded_scaled_and_seeded(fake_fashion_mnist_dir):
  config = tiny_config(fake_fashion_mnist_dir)
  config.train.d_steps = 2
  batch = next(input_pipeline.create_train_iterator(config, seed=0))
  assert batch['image'].shape == (2, 8, 32, 32, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (2, 8) and batch['label'].dtype == np.int32
  assert batch['image'].min() >= -1.0 and batch['image'].max() == 1.0
  # 28 px images are padded by 2 px of background (0 -> -1) to 32 px.
  np.testing.assert_array_equal(batch['image'][:, :, :2], -1.0)
  np.testing.assert_array_equal(batch['image'][:, :, :, -2:], -1.0)
  again = next(input_pipeline.create_train_iterator(config, seed=0))
  other = next(input_pipeline.create_train_iterator(config, seed=1))
  np.testing.assert_array_equal(batch['image'], again['image'])
  assert not np.array_equal(batch['label'], other['label'])


def test_missing_fashion_mnist_names_the_package_and_the_flag(tmp_path):
  config = tiny_config(str(tmp_path / 'nowhere'))
  with pytest.raises(ConfigError) as error:
    input_pipeline.check_source(config.data)
  assert 'apt-get install dataset-fashion-mnist' in str(error.value)
  assert '--config.data.fashion_mnist_dir' in str(error.value)


@pytest.mark.parametrize('name,fix', [('cifar10', 'tfds build cifar10'),
                                      ('imagenet2012', 'downloads/manual')])
def test_unprepared_tfds_data_never_downloads(tmp_path, name, fix):
  config = tiny_config()
  config.data.name = name
  config.data.tfds_data_dir = str(tmp_path)
  with pytest.raises(ConfigError, match='is not prepared') as error:
    input_pipeline.check_source(config.data)
  assert fix in str(error.value) and '--config.data.tfds_data_dir' in str(error.value)
  assert os.listdir(tmp_path) == []  # Nothing was fetched or created.


def test_unknown_data_name():
  config = tiny_config()
  config.data.name = 'mnist'
  with pytest.raises(ConfigError, match="unknown data.name 'mnist'.*--config.data.name"):
    input_pipeline.check_source(config.data)
