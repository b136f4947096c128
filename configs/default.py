"""Every field of a sagan_jax config, with the paper's recipe (ImageNet 128 px) as the default.

Other configs start from `get_config()` here and change what differs. Any field can be overridden
on the command line, e.g. `--config.model.ch=96 --config.train.batch_size=512`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the SAGAN ImageNet-128 recipe (docs/recipe.md)."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameters, latents and the data order.

  config.data = data = ml_collections.ConfigDict()
  # 'imagenet2012' or 'cifar10' (prepared tfds sets), 'folder' (data.folder_dir) or 'fashion_mnist'.
  data.name = 'imagenet2012'
  data.split = 'train'  # The tfds split, or the subfolder of data.folder_dir when it exists.
  data.tfds_data_dir = ml_collections.config_dict.placeholder(str)  # tfds data dir; None: default.
  # Images in class subfolders (sorted names -> labels): root/class/x.jpg or root/split/class/x.png.
  data.folder_dir = ml_collections.config_dict.placeholder(str)
  data.fashion_mnist_dir = '/usr/share/datasets/fashion-mnist'  # Where the IDX .gz files lie.
  data.resolution = 128  # Image size in pixels: 32, 64, 128 or 256.
  data.channels = 3  # 3 (RGB) or 1 (grayscale); images of other kinds are converted, alpha dropped.
  data.num_classes = 1000  # Number of class labels (conditional BN tables, projection embedding).
  # Decode large JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when the centred square
  # stays at least data.resolution px, then area-resize: about 1.4x faster decoding, with pixels
  # slightly different from a full decode (False: decode at full size).
  data.jpeg_downscale = True
  # Global batches built and put on the devices ahead of the step, on a thread (0: none, in line).
  data.prefetch = 2
  data.random_flip = True  # Random horizontal flips (seeded by the example's position: replayable).
  # tfds sets: records per shuffled block (each epoch: blocks in a seeded order, each permuted in
  # memory). Resuming reads one block, whatever the position in the epoch.
  data.shuffle_buffer = 10_000
  # Train on N examples of the split only (0: all), the same N every epoch: small-data runs (e.g.
  # with train.augment). Image folders and Fashion-MNIST: the first N of a fixed permutation of the
  # split (seed 0 whatever config.seed, classes mixed); tfds sets: the split's first N records
  # (tfds shuffled them when preparing). Reference statistics and the classifier read all of it.
  data.max_examples = 0

  config.model = model = ml_collections.ConfigDict()
  model.ch = 64  # Base width; blocks use multiples of it (architectures.ARCHITECTURES).
  # Channel multipliers of ch per map, in place of architectures.ARCHITECTURES' for the
  # resolution (() keeps those). G: its 4x4 input map, then each block's output (4 numbers at
  # 32 px, 6 at 128 px), e.g. '(8, 8, 4, 2)': wide at low resolution, narrow at high.
  model.g_widths = ()
  model.d_widths = ()  # D: each block's output (4 numbers at 32 px, 6 at 128 px).
  model.z_dim = 128  # Latent size; z ~ N(0, I).
  model.g_attention = (64,)  # G feature-map resolutions followed by self-attention (paper: 64).
  model.d_attention = (64,)  # D feature-map resolutions followed by self-attention (paper: 64).
  model.init = 'xavier'  # 'xavier' (the authors' code) or 'orthogonal' (BigGAN, StudioGAN).
  # Attention kernel: 'fused' (jax.nn.dot_product_attention, XLA), 'einsum' (plain softmax),
  # 'blockwise' (pure-JAX online softmax over key blocks: memory linear in positions, any backend),
  # 'cudnn' (cuDNN flash attention: GPUs, bfloat16, ch a multiple of 64) or 'auto' (per layer:
  # cudnn on GPUs in bfloat16, else blockwise when the keys exceed one block, else fused).
  model.attention_impl = 'fused'
  model.attention_block_size = 512  # Keys per block of 'blockwise' attention.
  model.bn_momentum = 0.9  # Decay of BN moving statistics (BigGAN-PyTorch's momentum 0.1).
  # D(x, y) = psi(h) + projection_scale * <embed(y), h>: how strongly D's score depends on the
  # class (1: the paper's projection discriminator; above 1, a stronger label signal).
  model.projection_scale = 1.0
  # G's class conditioning: 0, a gamma and beta table per class in each conditional BN (the
  # paper); N > 0, BigGAN's shared N-d class embedding with hierarchical z (z cut into one chunk
  # per G block plus one: z_dim must divide evenly), mapped linearly to each BN's gamma and beta.
  model.g_shared_embedding = 0
  # Computation dtype of convolutions, matmuls and attention: 'float32' or 'bfloat16' (mixed
  # precision: parameters, optimizer states, spectral norm, BN statistics, softmax and losses
  # stay float32; G's images and D's logits come out float32).
  model.dtype = 'float32'
  # Progressive growing (ProGAN; sagan_jax/progressive.py): the resolutions G and D are trained at,
  # stage by stage, each double the one before, from 8 or more up to data.resolution, e.g.
  # (32, 64, 128). Every stage's layers exist from the start (checkpoints keep one shape).
  # (): off, the paper's fixed-resolution SAGAN.
  model.progressive_resolutions = ()

  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 256  # Global batch (all devices, all processes) per D step and G step.
  train.num_steps = 1_000_000  # G steps (the paper trains 1M iterations).
  train.d_steps = 1  # D steps per G step; each D step reads its own real batch.
  # Micro-batches per D step and per G step: gradients of batch_size / grad_accum_steps examples
  # are averaged into one update (batch_size must be a multiple of devices * grad_accum_steps).
  # BN statistics are per micro-batch (G in both steps); D, without BN, sums exact gradients.
  train.grad_accum_steps = 1
  train.g_lr = 1e-4  # G's Adam learning rate (TTUR).
  train.d_lr = 4e-4  # D's Adam learning rate (TTUR).
  # From this G step on, both learning rates fall linearly to lr_decay_end_factor times their value
  # (0: to zero) at num_steps (0: constant, as in the paper). Short runs end steadier with it; it
  # changes no state, so it can be set on resume.
  train.lr_decay_start_step = 0
  train.lr_decay_end_factor = 0.0  # The rates' factor at num_steps (0: they end at zero).
  train.beta1 = 0.0  # Adam beta1 for both networks.
  # Adam beta2: the authors' code runs TF's default 0.999; the paper's text says 0.9.
  train.beta2 = 0.999
  train.adam_eps = 1e-8  # Adam epsilon (TF's default).
  train.loss = 'hinge'  # Adversarial loss: 'hinge', 'non_saturating' or 'wasserstein'.
  train.ema_decay = 0.9999  # Decay of the EMA of G's weights per G step.
  train.ema_start_step = 1000  # Before this step the EMA copies G's weights.
  # 'exponential' (ema_decay per step) or 'uniform': the EMA is the mean of G's weights after
  # every G step from ema_start_step on (Polyak averaging, SWA's average; ema_decay unused).
  train.ema_average = 'exponential'
  # A non-finite loss or parameter: 'stop' ends training at that step (the newest checkpoint
  # stays the last good one); 'skip' keeps the state from before the step, skips its batch, goes
  # on and counts it (train/nonfinite_skips in the log and TensorBoard).
  train.on_nonfinite = 'stop'
  # DiffAugment (Zhao et al. 2020, sagan_jax/augment.py) of every image D sees, real and fake, in
  # D's and G's losses: comma-separated ops applied in order, from 'color' (brightness,
  # saturation, contrast), 'translation' (up to 1/8 of the size, zero padded) and 'cutout' (a
  # square of half the size). For small data sets, where D memorizes the real images: the paper
  # recommends 'color,translation,cutout' for about 10% of a data set. '': off (the SAGAN recipe).
  train.augment = ''
  # Consistency regularization of D (sagan_jax/regularizers.py): weight * mean squared change of
  # D's logit when an image is transformed by `consistency_augment` (a DiffAugment policy). CR
  # (Zhang et al. 2020) regularizes the real images (their weight 10); bCR (Zhao et al. 2021) also
  # the fakes. Each costs one more D forward and backward per image. 0: off (the SAGAN recipe).
  train.consistency_weight = 0.0  # Real images (CR).
  train.consistency_fake_weight = 0.0  # Fake images (bCR).
  train.consistency_augment = 'translation'  # The transform T, drawn per image.
  # Progressive growing (model.progressive_resolutions): the G step at which each stage after the
  # first begins, increasing, within (0, num_steps); one per later stage.
  train.progressive_stage_steps = ()
  # Steps at the start of each later stage over which its new layers (and the real images' new
  # resolution) fade in linearly, alpha 0 -> 1; at most the shortest later stage (0: no fade).
  train.progressive_fade_steps = 0

  # CPU backend only: split the host's cores into this many JAX devices that share each batch
  # (data parallel; the demo's step runs 1.6x faster as 2 devices on 2 cores). 0: jax's default,
  # one device (XLA_FLAGS' --xla_force_host_platform_device_count wins when set). No effect on
  # GPU and TPU machines.
  config.cpu_devices = 0
  # JAX's persistent compilation cache (local or gs://): a restarted run (after a preemption) loads
  # its compiled steps instead of compiling them again. None: off, unless $JAX_COMPILATION_CACHE_DIR
  # is set. launch/tpu_vm.sh train sets WORKDIR/xla_cache.
  config.compilation_cache_dir = ml_collections.config_dict.placeholder(str)

  config.log_every_steps = 100  # Scalars to TensorBoard and the log.
  config.sample_every_steps = 5000  # PNG grids and TensorBoard images of fixed z and labels.
  config.checkpoint_every_steps = 5000  # Orbax checkpoints (resume picks the newest).
  # Also checkpoint when the newest checkpoint is this many minutes old (0: only by steps), so a
  # preemption that gives no warning loses at most this much time. A fresh run saves at once.
  config.checkpoint_every_minutes = 30.0
  config.keep_checkpoints = 3  # Newest checkpoints kept on disk.
  # A profiler trace of this many steps from `profile_first_step` on, in WORKDIR/plugins/profile
  # (TensorBoard's Profile tab; process 0). 0: no trace.
  config.profile_num_steps = 0  # Steps in the trace (0: no trace).
  config.profile_first_step = 10  # The trace starts at this step (after the first compile).

  config.sample = sample = ml_collections.ConfigDict()
  sample.num_rows = 10  # Rows of sample grids: one class each (classes spread over all labels).
  sample.num_columns = 10  # Samples per row (fixed z).
  sample.use_ema = True  # Grids and final samples from the EMA generator (else the raw one).
  sample.final_per_class = 0  # At the end, write this many samples per class to samples.npz.

  # Evaluation (sagan_jax.evaluation): during training every `every_steps`, and by
  # `python -m sagan_jax.evaluate --workdir=DIR`, whose flags override these fields.
  config.eval = eval_config = ml_collections.ConfigDict()
  # FID Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth or its converted
  # .npz (`python -m sagan_jax.inception`). None: $SAGAN_INCEPTION_PATH; no file: no FID/IS/KID.
  eval_config.inception_path = ml_collections.config_dict.placeholder(str)
  # Reference statistics of the training images (`python -m sagan_jax.reference_stats`) for FID,
  # KID and precision/recall. None: those metrics are skipped (IS still runs).
  eval_config.reference_stats = ml_collections.config_dict.placeholder(str)
  # A classifier trained on the data (`python -m sagan_jax.classifier`) for fd_classifier and
  # class_accuracy. None: WORKDIR/classifier.npz when it exists, else those metrics are skipped.
  eval_config.classifier_path = ml_collections.config_dict.placeholder(str)
  # Evaluate during training every this many steps (and at the last step); 0: never. Off here:
  # set it (e.g. 10_000) together with inception_path and reference_stats.
  eval_config.every_steps = 0
  # Metrics during training: any of fid, is, kid, precision_recall, fd_classifier,
  # class_accuracy, intra_fd_classifier (KID and precision/recall cost minutes of host time per
  # evaluation). intra_fd_classifier needs more than 128 samples in every class (else it is
  # skipped, saying so once) and a classifier of at most 100 classes.
  eval_config.metrics = ('fid', 'is', 'fd_classifier', 'class_accuracy', 'intra_fd_classifier')
  eval_config.num_samples = 10_000  # Samples per evaluation during training (the CLI: 50,000).
  eval_config.batch_size = 256  # Samples per batch over all devices (padded to the device count).
  eval_config.use_ema = True  # Evaluate the EMA generator during training (else the raw one).
  eval_config.truncation = 0.0  # Truncation threshold of z (0: plain N(0, I)).
  eval_config.standing_stats = 0  # Batches of standing BN statistics before evaluating (0: off).
  # WORKDIR/best keeps G of the step with the best score: 'fid', 'kid', 'fd_classifier',
  # 'intra_fd_classifier' (lower is better), 'is', 'precision', 'recall', 'class_accuracy',
  # 'worst_class_accuracy' (higher); '': no best checkpoint.
  eval_config.best_metric = 'fid'
  return config
