"""SAGAN's building blocks: spectral norm, self-attention and conditional batch norm.

The attention products themselves (einsum, fused, cuDNN, blockwise) are in sagan_jax.attention.

All modules are pure flax.linen modules. Their non-trainable state lives in explicit mutable
collections:
  * `spectral`: the power-iteration vectors `u` of every spectrally normalized weight;
  * `batch_stats`: the moving mean and variance of the batch norms.
A training forward updates them (the caller passes `mutable=[...]`); an evaluation forward only
reads them.

Mixed precision: with `dtype=jnp.bfloat16` the convolutions, matmuls and attention products run in
bfloat16, while parameters, the power iteration, batch-norm moments, softmax statistics and
accumulators stay float32.
"""

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sagan_jax import attention
from sagan_jax.errors import ConfigError

SPECTRAL = 'spectral'
BATCH_STATS = 'batch_stats'
SN_EPS = 1e-12  # As the authors' ops.py `_l2normalize`.

Initializer = Callable[..., jax.Array]


def create_kernel_init(name: str) -> Initializer:
  """Returns the weight initializer named by `config.model.init`.

  Args:
    name: 'xavier' (Glorot uniform, the authors' TF code) or 'orthogonal' (BigGAN, StudioGAN).
  """
  if name == 'xavier':
    return nn.initializers.xavier_uniform()
  if name == 'orthogonal':
    return nn.initializers.orthogonal()
  raise ConfigError(f"unknown model.init '{name}': set --config.model.init to 'xavier' or "
                    "'orthogonal'")


def _l2_normalize(x: jax.Array) -> jax.Array:
  return x / (jnp.sqrt(jnp.sum(x * x)) + SN_EPS)


def spectral_normalize(module: nn.Module, matrix: jax.Array, update: bool) -> jax.Array:
  """Divides `matrix` [fan_in, fan_out] by its largest singular value, estimated by power iteration.

  The estimate `u` (shape [1, fan_out]) is a variable of `module` in the `spectral` collection.
  In training (`update=True`) one power iteration runs and the new `u` is stored; in evaluation the
  stored `u` is only read, so it starts as a unit vector (a never-trained layer then reads sigma =
  |u W^T| <= sigma_1). No gradient flows through `u` or `v` (compare_gan's stop-gradient).
  The estimated sigma is sown into `intermediates` for inspection.
  """
  u_var = module.variable(
      SPECTRAL, 'u', lambda: _l2_normalize(
          jax.random.normal(module.make_rng('params'), (1, matrix.shape[-1]), jnp.float32)))
  w = matrix.astype(jnp.float32)
  u = u_var.value
  v = _l2_normalize(u @ w.T)
  if update:
    u = _l2_normalize(v @ w)
  u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
  sigma = (v @ w @ u.T)[0, 0]
  if update and not module.is_initializing():
    u_var.value = u
  module.sow('intermediates', 'sigma', sigma)
  return (w / sigma).astype(matrix.dtype)


def _add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y + bias computed in float32, returned in y's dtype.

  The bias gradient sums the output gradient over batch and space: in bfloat16 that sum loses
  most of its digits (seen: 4x the true gradient's norm as error), in float32 it does not. XLA
  fuses the casts into the convolution's or matmul's epilogue.
  """
  return (y.astype(jnp.float32) + bias).astype(y.dtype)


class SNDense(nn.Module):
  """Spectrally normalized linear layer with bias."""
  features: int
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, update_sn: bool) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    kernel = spectral_normalize(self, kernel, update_sn)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    return _add_bias(y, bias)


class SNConv(nn.Module):
  """Spectrally normalized 2-D convolution (NHWC, SAME padding, stride 1)."""
  features: int
  kernel_size: Sequence[int] = (3, 3)
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, update_sn: bool) -> jax.Array:
    shape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = self.param('kernel', self.kernel_init, shape, jnp.float32)
    # The authors reshape W to [-1, C_out] before the power iteration.
    kernel = spectral_normalize(self, kernel.reshape(-1, self.features), update_sn).reshape(shape)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), window_strides=(1, 1), padding='SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      y = _add_bias(y, self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32))
    return y


class SNEmbed(nn.Module):
  """Spectrally normalized class embedding of the projection discriminator.

  As the authors' code, the power iteration runs on the transposed table [features, classes].
  """
  num_classes: int
  features: int
  embedding_init: Initializer = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, labels: jax.Array, update_sn: bool) -> jax.Array:
    table = self.param('embedding', self.embedding_init, (self.num_classes, self.features),
                       jnp.float32)
    table = spectral_normalize(self, table.T, update_sn).T
    return jnp.take(table, labels, axis=0)


def _pool_windows_2x2(x: jax.Array) -> jax.Array:
  # A reshape instead of reduce_window: the same numbers, and a much cheaper gradient on CPU.
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  return jnp.max(_pool_windows_2x2(x), axis=(2, 4))


def avg_pool_2x2(x: jax.Array) -> jax.Array:
  return jnp.mean(_pool_windows_2x2(x), axis=(2, 4))


def upsample_2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x upsampling of NHWC maps."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class SelfAttention(nn.Module):
  """The authors' non-local block (official `non_local.py`, compare_gan `non_local_block`).

  theta, phi: 1x1 SN convs to C/8; g: 1x1 SN conv to C/2; phi and g are 2x2 max-pooled (N/4 keys);
  o = SN conv 1x1 (softmax(theta phi^T) g) back to C; y = x + gamma * o with a scalar gamma
  initialized to 0. The 1x1 convs carry no bias.

  `implementation` is one of attention.ATTENTION_CHOICES ('auto' resolves per layer from the
  number of keys, the dtype and the backend); `block_size` is the key block of 'blockwise'.
  """
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  implementation: str = 'fused'
  dtype: jnp.dtype = jnp.float32
  block_size: int = attention.DEFAULT_BLOCK_SIZE

  @nn.compact
  def __call__(self, x: jax.Array, update_sn: bool) -> jax.Array:
    batch, height, width, channels = x.shape
    conv = lambda features, name: SNConv(  # pylint: disable=g-long-lambda
        features, (1, 1), use_bias=False, kernel_init=self.kernel_init, dtype=self.dtype,
        name=name)
    theta = conv(channels // 8, 'theta')(x, update_sn).reshape(batch, -1, channels // 8)
    phi = max_pool_2x2(conv(channels // 8, 'phi')(x, update_sn)).reshape(batch, -1, channels // 8)
    g = max_pool_2x2(conv(channels // 2, 'g')(x, update_sn)).reshape(batch, -1, channels // 2)
    implementation = attention.resolve_attention_impl(
        self.implementation, phi.shape[1], channels // 8, self.dtype, self.block_size)
    if implementation == 'blockwise':
      attended = attention.attention_blockwise(theta, phi, g, self.block_size)
    else:
      attended = attention.ATTENTION_IMPLEMENTATIONS[implementation](theta, phi, g)
    attended = attended.reshape(batch, height, width, channels // 2)
    o = conv(channels, 'o')(attended, update_sn)
    gamma = self.param('gamma', nn.initializers.zeros, (), jnp.float32)
    return x + (gamma * o).astype(x.dtype)


class ConditionalBatchNorm(nn.Module):
  """Batch norm with per-class gamma (init 1) and beta (init 0) tables (official `ops.py`).

  With `num_classes=None` it is a plain batch norm with learned gamma and beta (G's last BN).
  With `linear=True` (BigGAN's shared embedding) `labels` is a conditioning vector [B, D] instead
  and gamma = 1 + W_g c, beta = W_b c (both W zero at init, so gamma starts at 1 as the tables do).
  Batch moments (in float32) in training, moving averages at evaluation.
  """
  num_classes: Optional[int] = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  linear: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, labels: Optional[jax.Array], use_running_average: bool
               ) -> jax.Array:
    channels = x.shape[-1]
    mean_var = self.variable(BATCH_STATS, 'mean', jnp.zeros, (channels,), jnp.float32)
    var_var = self.variable(BATCH_STATS, 'var', jnp.ones, (channels,), jnp.float32)
    if use_running_average:
      mean, var = mean_var.value, var_var.value
    else:
      x32 = x.astype(jnp.float32)
      mean = jnp.mean(x32, axis=(0, 1, 2))
      var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
      if not self.is_initializing():
        mean_var.value = self.momentum * mean_var.value + (1 - self.momentum) * mean
        var_var.value = self.momentum * var_var.value + (1 - self.momentum) * var
    if self.linear:
      cond = labels.astype(jnp.float32)
      dense = lambda name: nn.Dense(channels, kernel_init=nn.initializers.zeros, name=name)
      gamma = (1.0 + dense('gamma')(cond))[:, None, None, :]
      beta = dense('beta')(cond)[:, None, None, :]
    elif self.num_classes is None:
      gamma = self.param('gamma', nn.initializers.ones, (channels,), jnp.float32)
      beta = self.param('beta', nn.initializers.zeros, (channels,), jnp.float32)
    else:
      gamma_table = self.param('gamma', nn.initializers.ones, (self.num_classes, channels),
                               jnp.float32)
      beta_table = self.param('beta', nn.initializers.zeros, (self.num_classes, channels),
                              jnp.float32)
      if jnp.issubdtype(labels.dtype, jnp.floating):  # [B, classes] weights: blends of classes.
        gamma, beta = labels @ gamma_table, labels @ beta_table
      else:
        gamma, beta = jnp.take(gamma_table, labels, axis=0), jnp.take(beta_table, labels, axis=0)
      gamma, beta = gamma[:, None, None, :], beta[:, None, None, :]
    scale = gamma * jax.lax.rsqrt(var + self.epsilon)
    y = (x.astype(jnp.float32) - mean) * scale + beta
    return y.astype(x.dtype)
