"""SAGAN's Generator and Discriminator, built from a resolution, a width `ch` and multipliers.

The per-resolution tables and the config checks are in architectures.py. Self-attention is placed
by feature-map resolution, separately for G and D. With `model.progressive_resolutions` both can
be grown stage by stage (`_Grown`).
"""

import dataclasses
from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sagan_jax import attention as attention_lib
from sagan_jax import layers
from sagan_jax.architectures import (_block_size, architecture, check_model_config,
                                     d_block_input_resolutions, d_block_resolutions,
                                     g_block_resolutions, get_architecture,
                                     progressive_resolutions)


class GBlock(nn.Module):
  """CBN -> ReLU -> up -> conv3x3 -> CBN -> ReLU -> conv3x3; shortcut: up -> conv1x1."""
  features: int
  num_classes: int
  kernel_init: layers.Initializer
  bn_momentum: float
  dtype: jnp.dtype

  shared: bool = False  # `labels` is a conditioning vector (Generator.shared_dim).

  @nn.compact
  def __call__(self, x, labels, train: bool):
    conv = lambda k, name: layers.SNConv(  # pylint: disable=g-long-lambda
        self.features, (k, k), kernel_init=self.kernel_init, dtype=self.dtype, name=name)
    bn = lambda name: layers.ConditionalBatchNorm(  # pylint: disable=g-long-lambda
        self.num_classes, self.bn_momentum, linear=self.shared, name=name)
    h = nn.relu(bn('bn1')(x, labels, use_running_average=not train))
    h = conv(3, 'conv1')(layers.upsample_2x(h), train)
    h = nn.relu(bn('bn2')(h, labels, use_running_average=not train))
    h = conv(3, 'conv2')(h, train)
    return h + conv(1, 'shortcut')(layers.upsample_2x(x), train)


class DBlock(nn.Module):
  """Pre-activation ReLU -> conv3x3 -> ReLU -> conv3x3 [-> avgpool]; shortcut conv1x1 [-> avgpool].

  The first block (`optimized`) reads the image: conv3x3 -> ReLU -> conv3x3 -> avgpool, shortcut
  avgpool -> conv1x1. Otherwise the shortcut is the identity when widths match and nothing is
  downsampled.
  """
  features: int
  downsample: bool
  optimized: bool
  kernel_init: layers.Initializer
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, update_sn: bool):
    conv = lambda k, name: layers.SNConv(  # pylint: disable=g-long-lambda
        self.features, (k, k), kernel_init=self.kernel_init, dtype=self.dtype, name=name)
    h = x if self.optimized else nn.relu(x)
    h = conv(3, 'conv1')(h, update_sn)
    h = conv(3, 'conv2')(nn.relu(h), update_sn)
    if self.downsample:
      h = layers.avg_pool_2x2(h)
    if self.optimized:
      return h + conv(1, 'shortcut')(layers.avg_pool_2x2(x), update_sn)
    shortcut = x
    if self.downsample or x.shape[-1] != self.features:
      shortcut = conv(1, 'shortcut')(x, update_sn)
      if self.downsample:
        shortcut = layers.avg_pool_2x2(shortcut)
    return h + shortcut


PROGRESS = 'progress'  # The collection of the fade-in weight `alpha` (progressive growing).


class _Grown:
  """Progressive growing (Karras et al. 2018; sagan_jax.progressive), shared by G and D.

  `stages`: the resolutions grown through (empty: the paper's fixed network); the module computes
  stage `stage_resolution` (0: the last, data resolution). From the second stage on, new layers
  fade in, blended with the previous stage's by `alpha` (a float32 scalar in the 'progress'
  collection, set by the train step). `init` creates every stage's layers: one variable tree.
  """

  @property
  def stage(self) -> int:
    return self.stage_resolution or self.resolution

  @property
  def fades_in(self) -> bool:
    """Whether this stage blends its new layers in (every stage after the first)."""
    return bool(self.stages) and self.stage > self.stages[0]

  def _alpha(self) -> jax.Array:
    return self.variable(PROGRESS, 'alpha', lambda: jnp.ones((), jnp.float32)).value


def upsample_nearest(images: jax.Array, size: int) -> jax.Array:
  """NHWC images nearest-upsampled to `size` px (a multiple of theirs)."""
  factor = size // images.shape[1]
  return jnp.repeat(jnp.repeat(images, factor, axis=1), factor, axis=2)


class Generator(_Grown, nn.Module):
  """G(z, y): SN-linear -> 4x4 map -> up-blocks (+ attention) -> BN -> ReLU -> SN conv -> tanh."""
  resolution: int
  ch: int
  num_classes: int
  out_channels: int = 3
  attention: Sequence[int] = (64,)
  weight_init: str = 'xavier'
  attention_impl: str = 'fused'
  attention_block_size: int = attention_lib.DEFAULT_BLOCK_SIZE
  bn_momentum: float = 0.9
  dtype: jnp.dtype = jnp.float32
  # 0: per-class gamma and beta tables in every conditional BN (the paper). N > 0: BigGAN's shared
  # class embedding (N-d) and hierarchical z: z is cut into one chunk per block plus one for the
  # input layer, and block i's BNs read [embedding(y), z chunk i + 1] through linear maps.
  shared_dim: int = 0
  # Progressive growing (_Grown). A stage's G ends at its resolution with its own output head
  # (bn_out_R, conv_out_R; the last stage's are bn_out, conv_out). `output_resolution` above the
  # stage's: the images are nearest-upsampled to it (sample grids, evaluation at full size).
  stages: Tuple[int, ...] = ()
  stage_resolution: int = 0
  output_resolution: int = 0
  widths: Tuple[int, ...] = ()  # Multipliers of ch per map (model.g_widths; (): ARCHITECTURES').

  def _conditioning(self, z: jax.Array, labels: jax.Array, num_blocks: int):
    """(z for the input layer, each block's conditioning: the labels, or [embedding, z chunk])."""
    if not self.shared_dim:
      return z, [labels] * num_blocks
    table = self.param('shared_embedding', nn.initializers.normal(1.0),
                       (self.num_classes, self.shared_dim), jnp.float32)
    embedding = (labels @ table if jnp.issubdtype(labels.dtype, jnp.floating)  # Blends.
                 else jnp.take(table, labels, axis=0))
    chunks = jnp.split(z, num_blocks + 1, axis=-1)
    return chunks[0], [jnp.concatenate([embedding, c], axis=-1) for c in chunks[1:]]

  @nn.compact
  def __call__(self, z: jax.Array, labels: jax.Array, train: bool) -> jax.Array:
    """Returns images in [-1, 1], NHWC. `train` updates spectral vectors and BN statistics."""
    widths = [m * self.ch for m in self.widths or get_architecture(self.resolution).g_widths]
    kernel_init = layers.create_kernel_init(self.weight_init)
    z_in, conditioning = self._conditioning(z, labels, len(widths) - 1)
    h = layers.SNDense(4 * 4 * widths[0], kernel_init=kernel_init, dtype=self.dtype,
                       name='linear')(z_in, train)
    h = h.reshape(z.shape[0], 4, 4, widths[0])
    top = self.resolution if self.is_initializing() else self.stage  # init: every layer.
    maps = {}  # Each block's output (after its attention), for the stages' output heads.
    for i, (width, res) in enumerate(zip(widths[1:], g_block_resolutions(self.resolution))):
      if res > top:
        break
      h = GBlock(width, self.num_classes, kernel_init, self.bn_momentum, self.dtype,
                 bool(self.shared_dim), name=f'block{i}')(h, conditioning[i], train)
      if res in self.attention:
        h = layers.SelfAttention(kernel_init, self.attention_impl, self.dtype,
                                 self.attention_block_size, name=f'attention{res}')(h, train)
      maps[res] = h
    if not self.stages:
      return self._to_image(h, self.resolution, kernel_init, train)
    return self._grown_image(maps, kernel_init, train)

  def _to_image(self, h: jax.Array, res: int, kernel_init, train: bool) -> jax.Array:
    """The output head at `res` px: BN -> ReLU -> SN conv3x3 -> tanh."""
    suffix = '' if res == self.resolution else f'_{res}'
    h = layers.ConditionalBatchNorm(None, self.bn_momentum, name=f'bn_out{suffix}')(
        h, None, use_running_average=not train)
    h = layers.SNConv(self.out_channels, (3, 3), kernel_init=kernel_init, dtype=self.dtype,
                      name=f'conv_out{suffix}')(nn.relu(h), train)
    return jnp.tanh(h.astype(jnp.float32))

  def _grown_image(self, maps, kernel_init, train: bool) -> jax.Array:
    """The stage's image; while it fades in, alpha * it + (1 - alpha) * the previous stage's
    image (from the map before the new block) upsampled."""
    stage, alpha = self.stage, self._alpha()
    heads = self.stages if self.is_initializing() else (
        (stage, stage // 2) if self.fades_in else (stage,))
    images = {res: self._to_image(maps[res], res, kernel_init, train) for res in heads}
    image = images[stage]
    if self.fades_in:  # Computed at every step of the stage: one program per stage.
      image = alpha * image + (1.0 - alpha) * layers.upsample_2x(images[stage // 2])
    return upsample_nearest(image, max(self.output_resolution, stage))


class Discriminator(_Grown, nn.Module):
  """D(x, y): ResNet down-blocks (+ attention) -> ReLU -> sum -> SN-linear + projection."""
  resolution: int
  ch: int
  num_classes: int
  attention: Sequence[int] = (64,)
  weight_init: str = 'xavier'
  attention_impl: str = 'fused'
  attention_block_size: int = attention_lib.DEFAULT_BLOCK_SIZE
  dtype: jnp.dtype = jnp.float32
  projection_scale: float = 1.0  # Weight of the class projection term (1: the paper's D).
  # Progressive growing (_Grown). A stage's D reads its images through a from-RGB layer
  # (from_rgb_R: SN conv1x1 to the width of the map the first block of input resolution R reads),
  # then the blocks from there on; the last stage's block 0 reads the image itself.
  stages: Tuple[int, ...] = ()
  stage_resolution: int = 0
  widths: Tuple[int, ...] = ()  # Multipliers of ch per block (model.d_widths; (): ARCHITECTURES').

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array, update_sn: bool) -> jax.Array:
    """Returns one float32 logit per image; `update_sn` runs a power iteration and stores u."""
    arch = get_architecture(self.resolution)
    arch = dataclasses.replace(arch, d_widths=self.widths or arch.d_widths)
    kernel_init = layers.create_kernel_init(self.weight_init)
    inputs = d_block_input_resolutions(self.resolution)
    outputs = d_block_resolutions(self.resolution)
    from_rgb = {res: layers.SNConv(arch.d_widths[inputs.index(res) - 1] * self.ch, (1, 1),
                                   kernel_init=kernel_init, dtype=self.dtype,
                                   name=f'from_rgb_{res}') for res in self.stages[:-1]}
    stage = self.stage
    if self.stages and self.is_initializing():  # init: every stage's layers, the full network.
      x, stage = upsample_nearest(x, self.resolution), self.resolution
      for conv in from_rgb.values():
        conv(x, update_sn)
    attended = set()

    def attend(h, res):  # Once per resolution: on the map the first block of that input reads.
      if res in self.attention and res not in attended:
        attended.add(res)
        h = layers.SelfAttention(kernel_init, self.attention_impl, self.dtype,
                                 self.attention_block_size, name=f'attention{res}')(h, update_sn)
      return h

    first = inputs.index(stage)
    # A fading stage's new blocks (those reading its resolution) end in a blend with the previous
    # stage's entry: from_rgb of the 2x2-pooled images.
    blend_after = (len(inputs) - 1 - inputs[::-1].index(stage)
                   if self.stages and stage > self.stages[0] else None)
    h = x if first == 0 else attend(from_rgb[stage](x, update_sn), stage)
    for i in range(first, len(inputs)):
      h = DBlock(arch.d_widths[i] * self.ch, arch.d_downsample[i], i == 0, kernel_init,
                 self.dtype, name=f'block{i}')(h, update_sn)
      if i == blend_after:
        alpha = self._alpha()
        old = from_rgb[stage // 2](layers.avg_pool_2x2(x), update_sn)
        h = (alpha * h + (1.0 - alpha) * old).astype(h.dtype)
      h = attend(h, outputs[i])
    h = jnp.sum(nn.relu(h).astype(jnp.float32), axis=(1, 2))
    out = layers.SNDense(1, kernel_init=kernel_init, name='linear')(h, update_sn)[:, 0]
    embedding = layers.SNEmbed(self.num_classes, h.shape[-1], kernel_init, name='embed')(
        labels, update_sn)
    return out + self.projection_scale * jnp.sum(embedding * h, axis=-1)


def _common_fields(config):
  m = config.model
  return dict(resolution=config.data.resolution, ch=m.ch, num_classes=config.data.num_classes,
              weight_init=m.init, attention_impl=m.attention_impl,
              attention_block_size=_block_size(m), dtype=jnp.dtype(m.dtype),
              stages=progressive_resolutions(m))


def create_generator(config) -> Generator:
  """Builds G from `config.model` and `config.data` (validated first)."""
  check_model_config(config.model, config.data.resolution)
  return Generator(out_channels=config.data.channels, attention=tuple(config.model.g_attention),
                   bn_momentum=config.model.bn_momentum,
                   shared_dim=config.model.get('g_shared_embedding', 0),
                   widths=architecture(config.model, config.data.resolution).g_widths,
                   **_common_fields(config))


def create_models(config) -> Tuple[Generator, Discriminator]:
  """Builds G and D from `config.model` and `config.data` (validated first)."""
  discriminator = Discriminator(attention=tuple(config.model.d_attention),
                                projection_scale=config.model.get('projection_scale', 1.0),
                                widths=architecture(config.model, config.data.resolution).d_widths,
                                **_common_fields(config))
  return create_generator(config), discriminator
