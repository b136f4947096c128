"""Every field of a sagan_jax config, with the paper's recipe (ImageNet 128 px) as the default.

Other configs start from `get_config()` here and change what differs. Any field can be overridden
on the command line, e.g. `--config.model.ch=96 --config.train.batch_size=512`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the SAGAN ImageNet-128 recipe (REFERENCE.md)."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameters, latents and the data order.

  config.data = data = ml_collections.ConfigDict()
  data.name = 'imagenet2012'  # 'imagenet2012' or 'cifar10' (tfds), or 'fashion_mnist' (IDX files).
  data.split = 'train'  # The tfds split to train on.
  data.tfds_data_dir = ml_collections.config_dict.placeholder(str)  # tfds data dir; None: default.
  data.fashion_mnist_dir = '/usr/share/datasets/fashion-mnist'  # Where the IDX .gz files lie.
  data.resolution = 128  # Image size in pixels: 32, 64, 128 or 256.
  data.channels = 3  # Image channels (1 for grayscale data sets).
  data.num_classes = 1000  # Number of class labels (conditional BN tables, projection embedding).
  data.random_flip = True  # Random horizontal flips of the training images.
  data.shuffle_buffer = 10_000  # Examples in tf.data's shuffle buffer.

  config.model = model = ml_collections.ConfigDict()
  model.ch = 64  # Base width; each resolution's blocks use multiples of it (models.ARCHITECTURES).
  model.z_dim = 128  # Latent size; z ~ N(0, I).
  model.g_attention = (64,)  # G feature-map resolutions followed by self-attention (paper: 64).
  model.d_attention = (64,)  # D feature-map resolutions followed by self-attention (paper: 64).
  model.init = 'xavier'  # 'xavier' (the authors' code) or 'orthogonal' (BigGAN, StudioGAN).
  model.attention_impl = 'fused'  # 'fused' (jax.nn.dot_product_attention) or 'einsum'.
  model.bn_momentum = 0.9  # Decay of BN moving statistics (BigGAN-PyTorch's momentum 0.1).
  model.dtype = 'float32'  # Computation dtype of convolutions, matmuls and attention.

  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 256  # Global batch (all devices, all processes) per D step and G step.
  train.num_steps = 1_000_000  # G steps (the paper trains 1M iterations).
  train.d_steps = 1  # D steps per G step; each D step reads its own real batch.
  train.g_lr = 1e-4  # G's Adam learning rate (TTUR).
  train.d_lr = 4e-4  # D's Adam learning rate (TTUR).
  train.beta1 = 0.0  # Adam beta1 for both networks.
  # Adam beta2: the authors' code runs TF's default 0.999; the paper's text says 0.9.
  train.beta2 = 0.999
  train.adam_eps = 1e-8  # Adam epsilon (TF's default).
  train.loss = 'hinge'  # Adversarial loss: 'hinge', 'non_saturating' or 'wasserstein'.
  train.ema_decay = 0.9999  # Decay of the EMA of G's weights.
  train.ema_start_step = 1000  # Before this step the EMA copies G's weights.

  config.log_every_steps = 100  # Scalars to TensorBoard and the log.
  config.sample_every_steps = 5000  # PNG grids and TensorBoard images of fixed z and labels.
  config.checkpoint_every_steps = 5000  # Orbax checkpoints (resume picks the newest).
  config.keep_checkpoints = 3  # Newest checkpoints kept on disk.

  config.sample = sample = ml_collections.ConfigDict()
  sample.num_rows = 10  # Rows of sample grids: one class each (classes spread over all labels).
  sample.num_columns = 10  # Samples per row (fixed z).
  sample.use_ema = True  # Grids and final samples from the EMA generator (else the raw one).
  sample.final_per_class = 0  # At the end, write this many samples per class to samples.npz.
  return config
