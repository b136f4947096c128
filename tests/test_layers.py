"""Spectral norm, self-attention and conditional batch norm against numpy references."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sagan_jax import layers


def np_spectral_normalize(w: np.ndarray, u: np.ndarray) -> np.ndarray:
  """The evaluation-mode normalization of the authors' ops.py in numpy (u read, not updated)."""
  w = w.reshape(-1, w.shape[-1]).astype(np.float64)
  v = u @ w.T
  v = v / (np.sqrt(np.sum(v**2)) + 1e-12)
  sigma = (v @ w @ u.T)[0, 0]
  return w / sigma


def test_sigma_converges_to_largest_singular_value():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((20, 12)).astype(np.float32)
  dense = layers.SNDense(12)
  variables = dense.init(jax.random.PRNGKey(0), jnp.zeros((1, 20)), update_sn=True)
  params = {'kernel': jnp.asarray(w), 'bias': jnp.zeros(12)}
  spectral = variables['spectral']
  apply = jax.jit(lambda s: dense.apply({'params': params, 'spectral': s}, jnp.eye(20),
                                        update_sn=True, mutable=['spectral', 'intermediates']))
  for _ in range(100):
    out, new_vars = apply(spectral)
    spectral = new_vars['spectral']
  sigma = float(new_vars['intermediates']['sigma'][0])
  largest = np.linalg.svd(w, compute_uv=False)[0]
  np.testing.assert_allclose(sigma, largest, rtol=1e-5)
  # The layer's effective kernel (its output on the identity) has spectral norm 1.
  np.testing.assert_allclose(np.linalg.svd(np.asarray(out), compute_uv=False)[0], 1.0, rtol=1e-5)


def test_conv_kernel_is_normalized_as_a_matrix_of_shape_fan_in_by_out():
  conv = layers.SNConv(5, (3, 3))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 4))
  variables = conv.init(jax.random.PRNGKey(0), x, update_sn=True)
  kernel = np.asarray(variables['params']['kernel'])
  u = np.asarray(variables['spectral']['u'], np.float64)
  expected_kernel = np_spectral_normalize(kernel, u).reshape(kernel.shape)
  expected = jax.lax.conv_general_dilated(x, jnp.asarray(expected_kernel, jnp.float32), (1, 1),
                                          'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(conv.apply(variables, x, update_sn=False), expected, atol=1e-5)


def test_u_changes_in_training_and_not_in_evaluation():
  attention = layers.SelfAttention()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 16))
  variables = attention.init(jax.random.PRNGKey(0), x, update_sn=True)
  before = variables['spectral']
  _, trained = attention.apply(variables, x, update_sn=True, mutable=['spectral'])
  _, evaluated = attention.apply(variables, x, update_sn=False, mutable=['spectral'])
  for name in ('theta', 'phi', 'g', 'o'):
    assert not np.allclose(trained['spectral'][name]['u'], before[name]['u'])
    np.testing.assert_array_equal(evaluated['spectral'][name]['u'], before[name]['u'])


def np_max_pool_2x2(x: np.ndarray) -> np.ndarray:
  return np.maximum.reduce([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                            x[:, 1::2, 1::2]])


def np_authors_attention(x: np.ndarray, params, spectral) -> np.ndarray:
  """The authors' non_local block in numpy (float64), evaluation mode."""
  batch, height, width, channels = x.shape
  x = x.astype(np.float64)

  def conv1x1(h, name):
    w = np_spectral_normalize(np.asarray(params[name]['kernel']),
                              np.asarray(spectral[name]['u'], np.float64))
    return h @ w

  theta = conv1x1(x, 'theta').reshape(batch, -1, channels // 8)
  phi = np_max_pool_2x2(conv1x1(x, 'phi')).reshape(batch, -1, channels // 8)
  g = np_max_pool_2x2(conv1x1(x, 'g')).reshape(batch, -1, channels // 2)
  logits = theta @ phi.transpose(0, 2, 1)  # No 1/sqrt(d) scaling.
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  o = conv1x1((attn @ g).reshape(batch, height, width, channels // 2), 'o')
  return x + float(params['gamma']) * o


@pytest.fixture(scope='module')
def attention_case():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 6, 32))
  variables = layers.SelfAttention().init(jax.random.PRNGKey(0), x, update_sn=True)
  params = flax.core.unfreeze(variables['params'])
  params['gamma'] = jnp.asarray(0.7)
  return x, {'params': params, 'spectral': variables['spectral']}


def test_attention_is_the_identity_at_init(attention_case):
  x, variables = attention_case
  init_vars = layers.SelfAttention().init(jax.random.PRNGKey(0), x, update_sn=True)
  assert init_vars['params']['gamma'].shape == ()
  np.testing.assert_array_equal(layers.SelfAttention().apply(init_vars, x, update_sn=False), x)


def test_attention_shapes_follow_the_authors_block(attention_case):
  _, variables = attention_case
  shapes = {k: v['kernel'].shape for k, v in variables['params'].items() if k != 'gamma'}
  assert shapes == {'theta': (1, 1, 32, 4), 'phi': (1, 1, 32, 4), 'g': (1, 1, 32, 16),
                    'o': (1, 1, 16, 32)}
  assert not any('bias' in v for k, v in variables['params'].items() if k != 'gamma')


def test_fused_and_einsum_attention_agree(attention_case):
  x, variables = attention_case
  fused = layers.SelfAttention(implementation='fused').apply(variables, x, update_sn=False)
  plain = layers.SelfAttention(implementation='einsum').apply(variables, x, update_sn=False)
  np.testing.assert_allclose(fused, plain, atol=1e-5)
  assert float(jnp.max(jnp.abs(fused - x))) > 1e-2  # gamma = 0.7: attention did something.


@pytest.mark.parametrize('implementation', ['fused', 'einsum'])
def test_attention_matches_numpy_authors_block(attention_case, implementation):
  x, variables = attention_case
  out = layers.SelfAttention(implementation=implementation).apply(variables, x, update_sn=False)
  expected = np_authors_attention(np.asarray(x), variables['params'], variables['spectral'])
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_conditional_batch_norm_picks_per_class_parameters():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 2, 3, 5)).astype(np.float32)
  labels = np.array([0, 2, 1, 2])
  bn = layers.ConditionalBatchNorm(num_classes=3, momentum=0.9)
  variables = bn.init(jax.random.PRNGKey(0), x, labels, use_running_average=False)
  np.testing.assert_array_equal(variables['params']['gamma'], np.ones((3, 5)))
  np.testing.assert_array_equal(variables['params']['beta'], np.zeros((3, 5)))
  gamma = rng.standard_normal((3, 5)).astype(np.float32)
  beta = rng.standard_normal((3, 5)).astype(np.float32)
  variables = {'params': {'gamma': gamma, 'beta': beta},
               'batch_stats': variables['batch_stats']}
  out, updated = bn.apply(variables, x, labels, use_running_average=False,
                          mutable=['batch_stats'])
  mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  normalized = (x - mean) / np.sqrt(var + 1e-5)
  expected = normalized * gamma[labels][:, None, None] + beta[labels][:, None, None]
  np.testing.assert_allclose(out, expected, atol=1e-5)
  np.testing.assert_allclose(updated['batch_stats']['mean'], 0.1 * mean, atol=1e-6)
  np.testing.assert_allclose(updated['batch_stats']['var'], 0.9 + 0.1 * var, atol=1e-6)
  # Evaluation normalizes with the moving statistics.
  variables['batch_stats'] = updated['batch_stats']
  out_eval = bn.apply(variables, x, labels, use_running_average=True)
  running = (x - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var + 1e-5)
  np.testing.assert_allclose(out_eval, running * gamma[labels][:, None, None] +
                             beta[labels][:, None, None], atol=1e-5)


@pytest.fixture(scope='module')
def attention_operands():
  """theta [2, 40, 4], phi [2, 10, 4], g [2, 10, 16], an output weighting, einsum's results."""
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  theta = jax.random.normal(keys[0], (2, 40, 4))
  phi = jax.random.normal(keys[1], (2, 10, 4))
  g = jax.random.normal(keys[2], (2, 10, 16))
  weights = jax.random.normal(keys[3], (2, 40, 16))
  out, grads = _weighted_value_and_grads(layers.attention_einsum, weights, theta, phi, g)
  return theta, phi, g, weights, out, grads


def _weighted_value_and_grads(attention, weights, *operands):
  """attention(*operands) and the gradients of sum(weights * attention(...)), in one jit."""
  def loss(*args):
    out = attention(*args)
    return jnp.sum(weights * out), out
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(*operands)[::-1]


@pytest.mark.parametrize('block_size', [3, 5, 512])
def test_blockwise_attention_equals_einsum(attention_operands, block_size):
  """10 keys: blocks of 3 leave a padded last block, 5 gives two full ones, 512 one of 10."""
  theta, phi, g, weights, expected_out, expected_grads = attention_operands
  out, grads = _weighted_value_and_grads(
      lambda *args: layers.attention_blockwise(*args, block_size=block_size), weights, theta, phi,
      g)
  np.testing.assert_allclose(out, expected_out, atol=1e-5, rtol=1e-5)
  for got, want in zip(grads, expected_grads):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_blockwise_attention_keeps_bfloat16_and_float32_statistics(attention_operands):
  theta, phi, g = attention_operands[:3]
  bf16 = [x.astype(jnp.bfloat16) for x in (theta, phi, g)]
  out = layers.attention_blockwise(*bf16, block_size=4)
  assert out.dtype == jnp.bfloat16
  # Both round the same bf16 inputs; softmax and sums in float32: they differ by bf16 roundings.
  reference = layers.attention_einsum(*[x.astype(jnp.float32) for x in bf16])
  np.testing.assert_allclose(out.astype(jnp.float32), reference, atol=2e-2, rtol=2e-2)


def test_auto_attention_picks_blockwise_for_many_keys_off_gpu():
  assert jax.default_backend() == 'cpu'
  assert layers.resolve_attention_impl('auto', 4096, 16, jnp.bfloat16, 512) == 'blockwise'
  assert layers.resolve_attention_impl('auto', 256, 16, jnp.float32, 512) == 'fused'
  assert layers.resolve_attention_impl('einsum', 4096, 16, jnp.float32, 512) == 'einsum'


def test_blockwise_self_attention_matches_numpy_authors_block(attention_case):
  """48 queries and 12 keys in blocks of 5: the last block is padded."""
  x, variables = attention_case
  out = layers.SelfAttention(implementation='blockwise', block_size=5).apply(
      variables, x, update_sn=False)
  expected = np_authors_attention(np.asarray(x), variables['params'], variables['spectral'])
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_conv_keeps_float32_parameters_power_iteration_and_bias_gradient():
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 16, 16, 4))
  conv32, conv16 = layers.SNConv(8, (3, 3)), layers.SNConv(8, (3, 3), dtype=jnp.bfloat16)
  variables = conv32.init(jax.random.PRNGKey(0), x, update_sn=True)
  train = lambda conv: jax.jit(
      functools.partial(conv.apply, update_sn=True, mutable=['spectral']))(variables, x)
  (y16, state16), (_, state32) = train(conv16), train(conv32)
  assert y16.dtype == jnp.bfloat16 and state16['spectral']['u'].dtype == jnp.float32
  # The power iteration reads only the float32 kernel: the same u in both precisions.
  np.testing.assert_array_equal(state16['spectral']['u'], state32['spectral']['u'])

  def bias_grad(conv):
    def loss(params):
      y = conv.apply({'params': params, 'spectral': variables['spectral']}, x, update_sn=False)
      return jnp.sum(y.astype(jnp.float32) ** 2)
    return jax.jit(jax.grad(loss))(variables['params'])['bias']

  # The bias gradient sums 2048 output gradients per channel: accumulated in float32 it keeps
  # bf16's per-element precision (~0.4%); a bfloat16 sum would be off by far more.
  g16, g32 = bias_grad(conv16), bias_grad(conv32)
  assert g16.dtype == jnp.float32
  np.testing.assert_allclose(g16, g32, rtol=2e-2, atol=2e-2 * float(jnp.max(jnp.abs(g32))))
