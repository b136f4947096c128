"""SAGAN's Generator and Discriminator, built from a resolution, a width `ch` and multipliers.

The architectures follow the authors' ResNet SAGAN (docs/recipe.md) and BigGAN's per-resolution
tables. Self-attention is placed by feature-map resolution, separately for G and D. With
`model.progressive_resolutions` both can be grown stage by stage (`_Grown`).
"""

import dataclasses
from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sagan_jax import attention as attention_lib
from sagan_jax import layers
from sagan_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Architecture:
  """Channel multipliers of `ch` for one resolution.

  g_widths[0] is the width of G's 4x4 input map; G's block i maps g_widths[i] -> g_widths[i + 1]
  and doubles the resolution. D's block i outputs d_widths[i] channels, halving the resolution
  when d_downsample[i]; D's block 0 is the "optimized" block that reads the image.
  """
  g_widths: Tuple[int, ...]
  d_widths: Tuple[int, ...]
  d_downsample: Tuple[bool, ...]


ARCHITECTURES = {
    32: Architecture((4, 4, 4, 4), (4, 4, 4, 4), (True, True, False, False)),
    64: Architecture((16, 16, 8, 4, 2), (1, 2, 4, 8, 16), (True,) * 4 + (False,)),
    128: Architecture((16, 16, 8, 4, 2, 1), (1, 2, 4, 8, 16, 16), (True,) * 5 + (False,)),
    256: Architecture((16, 16, 8, 8, 4, 2, 1), (1, 2, 4, 8, 8, 16, 16), (True,) * 6 + (False,)),
}


def get_architecture(resolution: int) -> Architecture:
  if resolution not in ARCHITECTURES:
    raise ConfigError(f'unknown resolution {resolution}: set --config.data.resolution to one of '
                      f'{sorted(ARCHITECTURES)}')
  return ARCHITECTURES[resolution]


def g_block_resolutions(resolution: int) -> Tuple[int, ...]:
  """Output resolutions of G's blocks (where G's attention may go)."""
  n = len(get_architecture(resolution).g_widths) - 1
  return tuple(4 * 2**(i + 1) for i in range(n))


def d_block_resolutions(resolution: int) -> Tuple[int, ...]:
  """Output resolutions of D's blocks (where D's attention may go)."""
  out, res = [], resolution
  for down in get_architecture(resolution).d_downsample:
    res = res // 2 if down else res
    out.append(res)
  return tuple(out)


def d_block_input_resolutions(resolution: int) -> Tuple[int, ...]:
  """Input resolutions of D's blocks: block 0 reads the image, block i block i - 1's output."""
  return (resolution,) + d_block_resolutions(resolution)[:-1]


DTYPES = ('float32', 'bfloat16')  # Computation dtypes; parameters and statistics stay float32.


def attention_widths(model_config, resolution: int) -> Tuple[int, ...]:
  """Channels of the feature maps that G's and D's attention layers read."""
  arch = get_architecture(resolution)
  g = [m * model_config.ch for m, res in zip(arch.g_widths[1:], g_block_resolutions(resolution))
       if res in model_config.g_attention]
  d = [m * model_config.ch for m, res in zip(arch.d_widths, d_block_resolutions(resolution))
       if res in model_config.d_attention]
  return tuple(g + d)


def _block_size(model_config) -> int:
  # Configs saved in checkpoints before the field existed lack it.
  return model_config.get('attention_block_size', attention_lib.DEFAULT_BLOCK_SIZE)


def _check_attention_impl(model_config, resolution: int) -> None:
  impl = model_config.attention_impl
  if impl not in attention_lib.ATTENTION_CHOICES:
    raise ConfigError(f"unknown model.attention_impl '{impl}': set --config.model.attention_impl "
                      f'to one of {sorted(attention_lib.ATTENTION_CHOICES)}')
  if _block_size(model_config) < 1:
    raise ConfigError(f'model.attention_block_size={_block_size(model_config)} must be '
                      'positive: set --config.model.attention_block_size=512')
  if impl != 'cudnn':
    return
  if jax.default_backend() != 'gpu':
    raise ConfigError(f"model.attention_impl 'cudnn' runs on GPUs only (this backend is "
                      f"{jax.default_backend()}): set --config.model.attention_impl=blockwise")
  if model_config.dtype != 'bfloat16':
    raise ConfigError("model.attention_impl 'cudnn' has no float32 kernel: set "
                      '--config.model.dtype=bfloat16 or --config.model.attention_impl=blockwise')
  if any(c % 64 for c in attention_widths(model_config, resolution)):
    raise ConfigError("model.attention_impl 'cudnn' needs attention head sizes C/8 that are "
                      'multiples of 8: set --config.model.ch to a multiple of 64 or '
                      '--config.model.attention_impl=blockwise')


def check_model_config(model_config, resolution: int) -> None:
  """Raises ConfigError for settings the networks cannot be built with."""
  get_architecture(resolution)
  layers.create_kernel_init(model_config.init)
  if model_config.dtype not in DTYPES:
    raise ConfigError(f"unknown model.dtype '{model_config.dtype}': set --config.model.dtype to "
                      f"one of {list(DTYPES)}")
  for net, field, valid in (('G', 'g_attention', g_block_resolutions(resolution)),
                            ('D', 'd_attention', d_block_resolutions(resolution))):
    for res in getattr(model_config, field):
      if res not in valid or res < 2:
        raise ConfigError(
            f'{net} has no {res}x{res} feature map at {resolution} px: set --config.model.{field} '
            f'to resolutions among {sorted(set(r for r in valid if r >= 2))} (or an empty tuple)')
  if model_config.ch % 8:
    raise ConfigError(f'model.ch={model_config.ch} must be a multiple of 8 (attention uses C/8)')
  chunks = len(get_architecture(resolution).g_widths)  # One per G block + the input layer.
  if model_config.get('g_shared_embedding', 0) and model_config.z_dim % chunks:
    raise ConfigError(f'model.g_shared_embedding cuts z into {chunks} chunks at {resolution} px: '
                      f'set --config.model.z_dim to a multiple of {chunks}, e.g. '
                      f'{chunks * max(1, round(model_config.z_dim / chunks))}')
  _check_attention_impl(model_config, resolution)
  _check_stages(progressive_resolutions(model_config), resolution)


def progressive_resolutions(model_config) -> Tuple[int, ...]:
  # Configs saved in checkpoints before progressive growing existed lack the field.
  return tuple(model_config.get('progressive_resolutions', ()))


def _check_stages(stages: Tuple[int, ...], resolution: int) -> None:
  """Progressive growing's stages double from 8 px or more (G's first block) to the data's."""
  if not stages:
    return
  if (len(stages) < 2 or stages[0] < 8 or stages[-1] != resolution
      or any(b != 2 * a for a, b in zip(stages, stages[1:]))):
    example = tuple(resolution >> k for k in reversed(range(min(3, resolution.bit_length() - 3))))
    raise ConfigError(f'model.progressive_resolutions={stages} must double at each stage from 8 '
                      f'px or more up to data.resolution={resolution}: set '
                      f'--config.model.progressive_resolutions="{example}" (or "()": no growing)')


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
    widths = [m * self.ch for m in get_architecture(self.resolution).g_widths]
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

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array, update_sn: bool) -> jax.Array:
    """Returns one float32 logit per image; `update_sn` runs a power iteration and stores u."""
    arch = get_architecture(self.resolution)
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
                   shared_dim=config.model.get('g_shared_embedding', 0), **_common_fields(config))


def create_models(config) -> Tuple[Generator, Discriminator]:
  """Builds G and D from `config.model` and `config.data` (validated first)."""
  discriminator = Discriminator(attention=tuple(config.model.d_attention),
                                projection_scale=config.model.get('projection_scale', 1.0),
                                **_common_fields(config))
  return create_generator(config), discriminator
