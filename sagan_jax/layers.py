"""SAGAN's building blocks: spectral norm, self-attention and conditional batch norm.

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

import functools
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sagan_jax.errors import ConfigError

SPECTRAL = 'spectral'
BATCH_STATS = 'batch_stats'
SN_EPS = 1e-12  # As the authors' ops.py `_l2normalize`.
DEFAULT_BLOCK_SIZE = 512  # Keys per block of the blockwise attention.

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


def attention_einsum(theta: jax.Array, phi: jax.Array, g: jax.Array) -> jax.Array:
  """softmax(theta phi^T) g with no 1/sqrt(d) scaling; theta [B,N,d], phi [B,M,d], g [B,M,c]."""
  logits = jnp.einsum('bnd,bmd->bnm', theta, phi, preferred_element_type=jnp.float32)
  attn = jax.nn.softmax(logits, axis=-1).astype(g.dtype)
  return jnp.einsum('bnm,bmc->bnc', attn, g)


def attention_fused(theta: jax.Array, phi: jax.Array, g: jax.Array) -> jax.Array:
  """The same product through `jax.nn.dot_product_attention` (XLA's kernel), one head.

  dot_product_attention needs equal key and value head sizes, while SAGAN's g has c = 4d channels:
  theta and phi are zero-padded to c channels, which leaves theta phi^T unchanged. (Viewing g as
  c/d heads that share theta and phi is exact too, but XLA then builds c/d identical logit
  matrices: 3.5x the memory of this path in a fwd+bwd at 64x64.)
  """
  c, d = g.shape[-1], theta.shape[-1]
  if c < d:
    raise ValueError(f'value width {c} is smaller than the key width {d}')
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, c - d)))[:, :, None, :]
  out = jax.nn.dot_product_attention(pad(theta), pad(phi), g[:, :, None, :], scale=1.0)
  return out[:, :, 0, :]


def attention_cudnn(theta: jax.Array, phi: jax.Array, g: jax.Array) -> jax.Array:
  """softmax(theta phi^T) g through cuDNN's fused flash attention (GPUs, bf16/fp16 inputs).

  Memory linear in positions. cuDNN needs equal key and value head sizes of at most 128 (256 on
  Hopper), a multiple of 8: g (c = 4d channels) is viewed as c/d heads of size d that all share
  theta and phi; each head's output is softmax(theta phi^T) g[..., head], so concatenating the
  heads gives exactly the one-head result. The flash kernel never stores the logits.
  """
  batch, n, d = theta.shape
  m, c = g.shape[1], g.shape[2]
  if c % d:
    raise ValueError(f'value width {c} is not a multiple of the key width {d}')
  heads = c // d
  query = jnp.broadcast_to(theta[:, :, None, :], (batch, n, heads, d))
  key = jnp.broadcast_to(phi[:, :, None, :], (batch, m, heads, d))
  value = g.reshape(batch, m, heads, d)
  out = jax.nn.dot_product_attention(query, key, value, scale=1.0, implementation='cudnn')
  return out.reshape(batch, n, c)


def _key_blocks(x: jax.Array, block_size: int) -> jax.Array:
  """[B, M, c] -> [M_pad / block_size, B, block_size, c], zero-padded at the end of M."""
  batch, m, c = x.shape
  num_blocks = -(-m // block_size)
  x = jnp.pad(x, ((0, 0), (0, num_blocks * block_size - m), (0, 0)))
  return x.reshape(batch, num_blocks, block_size, c).transpose(1, 0, 2, 3)


def _merge_key_blocks(blocks: jax.Array, m: int) -> jax.Array:
  """The inverse of `_key_blocks`: [num_blocks, B, block_size, c] -> [B, M, c]."""
  num_blocks, batch, block_size, c = blocks.shape
  return blocks.transpose(1, 0, 2, 3).reshape(batch, num_blocks * block_size, c)[:, :m]


def _valid_keys(m: int, block_size: int) -> jax.Array:
  num_blocks = -(-m // block_size)
  return (jnp.arange(num_blocks * block_size) < m).reshape(num_blocks, 1, 1, block_size)


def _matmul(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
  # Operands in the computation dtype (bf16 for mixed precision), accumulation in float32.
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _blockwise_forward(theta, phi, g, block_size):
  """Online softmax over key blocks; returns the output and the log-sum-exp of each query row."""
  batch, n, _ = theta.shape
  m, c = g.shape[1], g.shape[2]

  def body(carry, block):
    row_max, row_sum, acc = carry
    phi_block, g_block, valid = block
    logits = _matmul('bnd,bkd->bnk', theta, phi_block, theta.dtype)
    logits = jnp.where(valid, logits, -jnp.inf)
    # Every block holds at least one real key, so new_max is finite and nothing is NaN.
    new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1))
    correction = jnp.exp(row_max - new_max)
    probs = jnp.exp(logits - new_max[..., None])
    row_sum = row_sum * correction + jnp.sum(probs, axis=-1)
    acc = acc * correction[..., None] + _matmul('bnk,bkc->bnc', probs, g_block, g.dtype)
    return (new_max, row_sum, acc), None

  init = (jnp.full((batch, n), -jnp.inf, jnp.float32), jnp.zeros((batch, n), jnp.float32),
          jnp.zeros((batch, n, c), jnp.float32))
  blocks = (_key_blocks(phi, block_size), _key_blocks(g, block_size), _valid_keys(m, block_size))
  (row_max, row_sum, acc), _ = jax.lax.scan(body, init, blocks)
  out = (acc / row_sum[..., None]).astype(g.dtype)
  return out, row_max + jnp.log(row_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blockwise_attention(theta, phi, g, block_size):
  return _blockwise_forward(theta, phi, g, block_size)[0]


def _blockwise_attention_fwd(theta, phi, g, block_size):
  out, lse = _blockwise_forward(theta, phi, g, block_size)
  return out, (theta, phi, g, out, lse)


def _blockwise_attention_bwd(block_size, residuals, d_out):
  """Flash attention's backward: recomputes each key block's probabilities from the saved lse.

  Saves only theta, phi, g, the output and one lse per query: no [N, M] matrix is kept.
  """
  theta, phi, g, out, lse = residuals
  m, dtype = g.shape[1], theta.dtype
  d_out32 = d_out.astype(jnp.float32)
  # sum_k p_k dp_k per query: the softmax's Jacobian term.
  delta = jnp.sum(d_out32 * out.astype(jnp.float32), axis=-1)

  def body(d_theta, block):
    phi_block, g_block, valid = block
    logits = _matmul('bnd,bkd->bnk', theta, phi_block, dtype)
    probs = jnp.where(valid, jnp.exp(logits - lse[..., None]), 0.0)
    d_g_block = _matmul('bnk,bnc->bkc', probs, d_out32, g.dtype)
    d_probs = _matmul('bnc,bkc->bnk', d_out32, g_block, g.dtype)
    d_logits = probs * (d_probs - delta[..., None])
    d_theta = d_theta + _matmul('bnk,bkd->bnd', d_logits, phi_block, dtype)
    d_phi_block = _matmul('bnk,bnd->bkd', d_logits, theta, dtype)
    return d_theta, (d_phi_block, d_g_block)

  blocks = (_key_blocks(phi, block_size), _key_blocks(g, block_size), _valid_keys(m, block_size))
  d_theta, (d_phi, d_g) = jax.lax.scan(body, jnp.zeros(theta.shape, jnp.float32), blocks)
  return (d_theta.astype(theta.dtype), _merge_key_blocks(d_phi, m).astype(phi.dtype),
          _merge_key_blocks(d_g, m).astype(g.dtype))


_blockwise_attention.defvjp(_blockwise_attention_fwd, _blockwise_attention_bwd)


def attention_blockwise(theta: jax.Array, phi: jax.Array, g: jax.Array,
                        block_size: int = DEFAULT_BLOCK_SIZE) -> jax.Array:
  """softmax(theta phi^T) g in pure JAX with memory linear in positions (any backend).

  Keys are taken `block_size` at a time (the last block zero-padded and masked) with an online
  softmax (Milakov and Gimelshein 2018; FlashAttention): only a [B, N, block_size] logit block
  lives at once, forward and backward, instead of the [B, N, M] matrix. The backward pass is a
  custom VJP that recomputes the blocks. Softmax statistics and accumulators are float32.
  """
  return _blockwise_attention(theta, phi, g, min(block_size, phi.shape[1]))


ATTENTION_IMPLEMENTATIONS = {'einsum': attention_einsum, 'fused': attention_fused,
                             'blockwise': attention_blockwise, 'cudnn': attention_cudnn}
# 'auto' picks one of the above per attention layer: see `resolve_attention_impl`.
ATTENTION_CHOICES = ('auto', *ATTENTION_IMPLEMENTATIONS)


def resolve_attention_impl(name: str, num_keys: int, head_size: int, dtype,
                           block_size: int = DEFAULT_BLOCK_SIZE) -> str:
  """The implementation 'auto' stands for; other names are returned unchanged.

  'auto': 'cudnn' on GPUs when the computation dtype is bfloat16 or float16 and the head size is a
  multiple of 8 (cuDNN's limits); otherwise 'blockwise' when the keys fill more than one block
  (large feature maps, where the [N, M] matrix would be large), else 'fused'.
  """
  if name != 'auto':
    return name
  low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if jax.default_backend() == 'gpu' and low_precision and head_size % 8 == 0:
    return 'cudnn'
  return 'blockwise' if num_keys > block_size else 'fused'


class SelfAttention(nn.Module):
  """The authors' non-local block (official `non_local.py`, compare_gan `non_local_block`).

  theta, phi: 1x1 SN convs to C/8; g: 1x1 SN conv to C/2; phi and g are 2x2 max-pooled (N/4 keys);
  o = SN conv 1x1 (softmax(theta phi^T) g) back to C; y = x + gamma * o with a scalar gamma
  initialized to 0. The 1x1 convs carry no bias.

  `implementation` is one of ATTENTION_CHOICES ('auto' resolves per layer from the number of
  keys, the dtype and the backend); `block_size` is the key block of 'blockwise'.
  """
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  implementation: str = 'fused'
  dtype: jnp.dtype = jnp.float32
  block_size: int = DEFAULT_BLOCK_SIZE

  @nn.compact
  def __call__(self, x: jax.Array, update_sn: bool) -> jax.Array:
    batch, height, width, channels = x.shape
    conv = lambda features, name: SNConv(  # pylint: disable=g-long-lambda
        features, (1, 1), use_bias=False, kernel_init=self.kernel_init, dtype=self.dtype,
        name=name)
    theta = conv(channels // 8, 'theta')(x, update_sn).reshape(batch, -1, channels // 8)
    phi = max_pool_2x2(conv(channels // 8, 'phi')(x, update_sn)).reshape(batch, -1, channels // 8)
    g = max_pool_2x2(conv(channels // 2, 'g')(x, update_sn)).reshape(batch, -1, channels // 2)
    implementation = resolve_attention_impl(self.implementation, phi.shape[1], channels // 8,
                                            self.dtype, self.block_size)
    if implementation == 'blockwise':
      attended = attention_blockwise(theta, phi, g, self.block_size)
    else:
      attended = ATTENTION_IMPLEMENTATIONS[implementation](theta, phi, g)
    attended = attended.reshape(batch, height, width, channels // 2)
    o = conv(channels, 'o')(attended, update_sn)
    gamma = self.param('gamma', nn.initializers.zeros, (), jnp.float32)
    return x + (gamma * o).astype(x.dtype)


class ConditionalBatchNorm(nn.Module):
  """Batch norm with per-class gamma (init 1) and beta (init 0) tables (official `ops.py`).

  With `num_classes=None` it is a plain batch norm with learned gamma and beta (G's last BN).
  Batch moments (in float32) in training, moving averages at evaluation.
  """
  num_classes: Optional[int] = None
  momentum: float = 0.9
  epsilon: float = 1e-5

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
    if self.num_classes is None:
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
