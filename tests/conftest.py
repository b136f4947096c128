"""Shared test set-up: 8 CPU devices, tiny configs and generated Fashion-MNIST-style IDX files."""

import gzip
import os
import struct
import tempfile

# Must precede the first jax import: the sharded path is tested on 8 host devices.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# One compilation cache for the whole session, shared with the training subprocesses the tests
# start: a restarted run compiles nothing its predecessor already compiled.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='sagan_jax_xla_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import fashion_mnist  # pylint: disable=g-import-not-at-top,wrong-import-position


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes a uint8 array as a gzipped IDX file (the Fashion-MNIST format)."""
  header = struct.pack('>HBB', 0, 0x08, array.ndim) + struct.pack('>' + 'I' * array.ndim,
                                                                  *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def make_fake_fashion_mnist(directory: str, num_train: int = 64, num_test: int = 32) -> None:
  """IDX files whose class c images are a bright square at a class-dependent spot."""
  rng = np.random.default_rng(0)
  for split, n in (('train', num_train), ('test', num_test)):
    labels = np.arange(n) % 10
    images = rng.integers(0, 30, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
      images[i, 2 * c:2 * c + 8, 4:20] = 255
    prefix = 'train' if split == 'train' else 't10k'
    write_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'), images)
    write_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'), labels)


@pytest.fixture(scope='session')
def fake_fashion_mnist_dir(tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp('fashion_mnist'))
  make_fake_fashion_mnist(directory)
  return directory


def tiny_config(data_dir: str = '/nonexistent'):
  """The demo config shrunk for tests: 32 px, ch 8, batch 8, a few steps."""
  config = fashion_mnist.get_config()
  config.data.fashion_mnist_dir = data_dir
  config.data.shuffle_buffer = 64
  config.model.ch = 8
  config.model.g_widths = config.model.d_widths = ()  # The table's: 32 channels everywhere.
  config.train.batch_size = 8
  config.train.num_steps = 3
  config.train.ema_start_step = 1
  config.train.ema_average = 'exponential'  # The tests' exact EMA expectations decay by ema_decay.
  config.log_every_steps = 1
  config.sample_every_steps = 2
  config.checkpoint_every_steps = 2
  config.checkpoint_every_minutes = 0.0  # Saves at fixed steps only (no save at the first step).
  config.sample.num_columns = 2
  config.sample.final_per_class = 0
  return config
