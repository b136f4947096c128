"""Self-attention kernels: softmax(theta phi^T) g for SAGAN's non-local block, four ways.

- 'einsum': the plain two matmuls and a softmax between them (the [N, M] matrix in memory);
- 'fused': jax.nn.dot_product_attention's XLA path;
- 'cudnn': cuDNN's fused attention on GPUs (bfloat16 / float16);
- 'blockwise': keys in blocks with an online softmax and a custom backward (memory O(N block)).
`resolve_attention_impl` says what 'auto' picks. layers.SelfAttention calls them.
"""

import functools

import jax
import jax.numpy as jnp

DEFAULT_BLOCK_SIZE = 512  # Keys per block of the blockwise attention.


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
