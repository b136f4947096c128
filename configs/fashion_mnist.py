"""The demo: class-conditional SAGAN on Fashion-MNIST, 32x32 grayscale, on 2 CPU cores.

Reads Debian's `dataset-fashion-mnist` IDX files (data.fashion_mnist_dir). Sized to train in at
most 15 minutes on a 2-core machine; see README for the measured time and sample accuracy.
"""

from configs import default


def get_config():
  """A narrow 32 px SAGAN with attention at 16x16 in G and D."""
  config = default.get_config()
  config.data.name = 'fashion_mnist'
  config.data.resolution = 32
  config.data.channels = 1
  config.data.num_classes = 10
  config.data.random_flip = False  # Fashion-MNIST garments have a fixed orientation.
  config.model.ch = 8  # 4 * 8 = 32 channels in every block.
  config.model.g_attention = (16,)
  config.model.d_attention = (16,)
  config.train.batch_size = 32  # Small batches: more steps in the 15-minute budget.
  config.train.num_steps = 1400  # About 13 minutes on 2 CPU cores (README).
  config.train.g_lr = 2e-4  # Faster than the paper's 1e-4 for the short run; D keeps 4e-4.
  config.train.beta2 = 0.9  # The paper's text.
  config.train.ema_decay = 0.99  # A short average: G still changes fast at the end of the run.
  config.train.ema_start_step = 800
  config.log_every_steps = 50
  config.sample_every_steps = 400
  config.checkpoint_every_steps = 400
  config.sample.num_rows = 10
  config.sample.final_per_class = 100
  return config
