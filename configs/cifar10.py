"""SAGAN on CIFAR-10 at 32x32 (tfds `cifar10`, prepared beforehand with `tfds build cifar10`)."""

from configs import default


def get_config():
  """StudioGAN-like CIFAR-10 settings on the SAGAN recipe."""
  config = default.get_config()
  config.data.name = 'cifar10'
  config.data.resolution = 32
  config.data.num_classes = 10
  config.model.ch = 64  # Blocks of 4 * 64 = 256 channels, as BigGAN's 32 px network.
  config.model.g_attention = (16,)  # The 16x16 maps of G (the middle of three blocks).
  config.model.d_attention = (16,)  # D's first block output.
  config.train.batch_size = 64
  config.train.num_steps = 100_000
  config.train.d_steps = 5  # StudioGAN runs 5 D steps per G step on CIFAR-10.
  config.train.g_lr = 1e-4
  config.train.d_lr = 4e-4
  config.train.ema_start_step = 1000
  config.sample.num_rows = 10
  return config
