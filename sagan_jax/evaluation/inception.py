"""The FID Inception-v3 in Flax: pytorch-fid's network layer for layer.

The network is pytorch-fid's `fid_inception_v3()` (a port of TF's 2015-12-05 Inception graph):
torchvision's Inception-v3 stem and B/D blocks, the FID variants of the A, C and E blocks (average
pools that ignore padding, a max pool in Mixed_7c's pool branch), BN eps 1e-3 and 1008 logits.
Inputs follow pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`: NHWC images
in [0, 1] (float) or [0, 255] (uint8), bilinear resize to 299x299 as torch's
`interpolate(mode='bilinear', align_corners=False)` (no antialiasing), then scaling to [-1, 1].

Its weights (pytorch-fid's .pth or a converted .npz) are read by
sagan_jax.evaluation.inception_weights.

Convolutions run at `Precision.HIGHEST`: the TPU default (one bfloat16 pass) and TF32 on GPUs move
the 2048-d features far more than FID's comparability allows.
"""

import functools
from typing import Any, Callable, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
HIGHEST = jax.lax.Precision.HIGHEST

Variables = Dict[str, Any]


def _pair(v) -> Tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """torchvision's BasicConv2d: conv without bias, BN (eps 1e-3, moving statistics), ReLU."""
  features: int
  kernel_size: Any
  strides: int = 1
  padding: Any = 0
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, _pair(self.kernel_size), self.strides,
                [(p, p) for p in _pair(self.padding)], use_bias=False, precision=self.precision,
                name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # TF's average pool divides by the number of real (unpadded) inputs. (The divisor's dtype
  # follows jax_enable_x64; the cast keeps float32 float32.)
  pooled = nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)
  return pooled.astype(x.dtype)


def _max_pool_3x3_stride_2(x):
  return nn.max_pool(x, (3, 3), (2, 2))


class InceptionA(nn.Module):
  """FIDInceptionA (Mixed_5b-d)."""
  pool_features: int
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(64, 1, name='branch1x1')(x)
    b5 = conv(48, 1, name='branch5x5_1')(x)
    b5 = conv(64, 5, padding=2, name='branch5x5_2')(b5)
    b3 = conv(64, 1, name='branch3x3dbl_1')(x)
    b3 = conv(96, 3, padding=1, name='branch3x3dbl_2')(b3)
    b3 = conv(96, 3, padding=1, name='branch3x3dbl_3')(b3)
    bp = conv(self.pool_features, 1, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """torchvision's InceptionB (Mixed_6a): 35x35 -> 17x17."""
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(384, 3, strides=2, name='branch3x3')(x)
    bd = conv(64, 1, name='branch3x3dbl_1')(x)
    bd = conv(96, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = conv(96, 3, strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_stride_2(x)], axis=-1)


class InceptionC(nn.Module):
  """FIDInceptionC (Mixed_6b-e): factorized 7x7 convolutions."""
  channels_7x7: int
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    b1 = conv(192, 1, name='branch1x1')(x)
    b7 = conv(c7, 1, name='branch7x7_1')(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = conv(c7, 1, name='branch7x7dbl_1')(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = conv(192, 1, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """torchvision's InceptionD (Mixed_7a): 17x17 -> 8x8."""
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b3 = conv(192, 1, name='branch3x3_1')(x)
    b3 = conv(320, 3, strides=2, name='branch3x3_2')(b3)
    b7 = conv(192, 1, name='branch7x7x3_1')(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = conv(192, 3, strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_stride_2(x)], axis=-1)


class InceptionE(nn.Module):
  """FIDInceptionE_1 (pool='avg', Mixed_7b) and FIDInceptionE_2 (pool='max', Mixed_7c)."""
  pool: str
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    b1 = conv(320, 1, name='branch1x1')(x)
    b3 = conv(384, 1, name='branch3x3_1')(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                          conv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)], axis=-1)
    bd = conv(448, 1, name='branch3x3dbl_1')(x)
    bd = conv(384, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
                          conv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)], axis=-1)
    if self.pool == 'avg':
      pooled = _avg_pool_3x3(x)
    else:  # The TF graph's Mixed_7c pools with max (pytorch-fid keeps this quirk).
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    bp = conv(192, 1, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] weights of torch's bilinear interpolate (align_corners=False) on one axis.

  Half-pixel centres, source positions below 0 clamped to 0, no antialiasing on downscale: the same
  as `jax.image.resize(..., antialias=False)`, whereas its default (antialias=True) averages over
  more pixels when downscaling. Weights in float32, as torch's float32 kernel computes them.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  src = np.maximum(src, np.float32(0))
  lower = np.minimum(src.astype(np.int64), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  frac = src - lower.astype(np.float32)
  weights = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lower), np.float32(1) - frac)
  np.add.at(weights, (rows, upper), frac)
  return weights


def resize_bilinear(images, size: Tuple[int, int], precision=HIGHEST):
  """Resizes NHWC `images` to `size` as torch's bilinear interpolate with align_corners=False."""
  height, width = images.shape[1:3]
  if (height, width) == tuple(size):
    return images
  rows = jnp.asarray(resize_matrix(height, size[0]))
  cols = jnp.asarray(resize_matrix(width, size[1]))
  return jnp.einsum('oh,nhwc,pw->nopc', rows, images, cols, precision=precision)


def preprocess(images, precision=HIGHEST):
  """pytorch-fid's input transform: [0, 1] (or uint8 [0, 255]) -> 299x299 in [-1, 1].

  One-channel images are repeated to RGB, as pytorch-fid's loader converts them to RGB.
  """
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 255.0
  images = images.astype(jnp.float32)
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  images = resize_bilinear(images, (INPUT_SIZE, INPUT_SIZE), precision)
  return 2.0 * images - 1.0


class FIDInceptionV3(nn.Module):
  """pytorch-fid's FID Inception-v3 on NHWC images; returns pool3 features and logits.

  Images: float in [0, 1] (a generator's tanh output x goes in as (x + 1) / 2) or uint8, any
  size (resized to 299x299), 3 channels or 1 (repeated). Returns a dict: 'pool3' [N, 2048] (the
  global average pool FID uses), 'logits' [N, 1008] (the fc layer with its bias) and
  'logits_unbiased' [N, 1008] (without the bias: what the original Inception Score code and
  torch-fidelity take the softmax of). The outputs of pytorch-fid's blocks 0-2 are sown as
  'intermediates' ('block0': 64, 'block1': 192, 'block2': 768 channels).
  """
  precision: Any = HIGHEST

  @nn.compact
  def __call__(self, images):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    x = preprocess(images, self.precision)
    x = conv(32, 3, strides=2, name='Conv2d_1a_3x3')(x)
    x = conv(32, 3, name='Conv2d_2a_3x3')(x)
    x = conv(64, 3, padding=1, name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_stride_2(x)
    self.sow('intermediates', 'block0', x)
    x = conv(80, 1, name='Conv2d_3b_1x1')(x)
    x = conv(192, 3, name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3_stride_2(x)
    self.sow('intermediates', 'block1', x)
    for name, pool_features in (('Mixed_5b', 32), ('Mixed_5c', 64), ('Mixed_5d', 64)):
      x = InceptionA(pool_features, self.precision, name=name)(x)
    x = InceptionB(self.precision, name='Mixed_6a')(x)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(c7, self.precision, name=name)(x)
    self.sow('intermediates', 'block2', x)
    x = InceptionD(self.precision, name='Mixed_7a')(x)
    x = InceptionE('avg', self.precision, name='Mixed_7b')(x)
    x = InceptionE('max', self.precision, name='Mixed_7c')(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    kernel = self.param('fc_kernel', nn.initializers.lecun_normal(), (pool3.shape[-1], 1008))
    bias = self.param('fc_bias', nn.initializers.zeros, (1008,))
    logits_unbiased = jnp.dot(pool3, kernel, precision=self.precision)
    return {'pool3': pool3, 'logits': logits_unbiased + bias, 'logits_unbiased': logits_unbiased}


def create_inception_fn(variables: Variables,
                        precision=HIGHEST) -> Callable[[Any], Dict[str, jax.Array]]:
  """A jitted `images -> {'pool3', 'logits', 'logits_unbiased'}` with `variables` bound.

  The variables are an argument of the compiled function, not constants baked into it.
  """
  apply_fn = jax.jit(FIDInceptionV3(precision).apply)
  return lambda images: apply_fn(variables, images)
