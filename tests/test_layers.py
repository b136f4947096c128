"""Spectral norm, self-attention and conditional batch norm against numpy references."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sagan_jax import attention
from sagan_jax import layers
from tests import tolerances
from tests.tolerances import EPS32
from tests.tolerances import gamma as gamma_n


def np_spectral_normalize(w: np.ndarray, u: np.ndarray) -> np.ndarray:
  """The evaluation-mode normalization of the authors' ops.py in numpy (u read, not updated)."""
  w = w.reshape(-1, w.shape[-1]).astype(np.float64)
  v = u @ w.T
  v = v / (np.sqrt(np.sum(v**2)) + 1e-12)
  sigma = (v @ w @ u.T)[0, 0]
  return w / sigma


def sn_relative_error(w: np.ndarray, u: np.ndarray) -> float:
  """How far (relative) the float32 W / sigma of layers.spectral_normalize can be from float64.

  v = normalize(u W^T) and sigma = v W u^T take at most 2 (fan_in + fan_out) + 4 roundings on any
  path, each at most u relative to a term of sigma's absolute sum |v| |W| |u|^T
  (tests/tolerances.py); the division W / sigma adds one more.
  """
  w = w.reshape(-1, w.shape[-1]).astype(np.float64)
  u = np.asarray(u, np.float64)
  v = u @ w.T / np.linalg.norm(u @ w.T)
  sigma = (v @ w @ u.T).item()
  abs_sigma = (np.abs(v) @ np.abs(w) @ np.abs(u).T).item()
  return gamma_n(2 * sum(w.shape) + 4) * abs_sigma / abs(sigma) + EPS32 / 2


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
  singular_values, right = np.linalg.svd(w.astype(np.float64))[1:]
  largest = singular_values[0]
  # Tolerance: sigma = |v W| is off by at most sigma_1 tan^2 of u's angle to the top singular
  # vector, which 100 iterations shrink by at least (sigma_2 / sigma_1)^200; plus sigma's float32
  # rounding (sn_relative_error, from the sums of absolute terms).
  u0 = np.asarray(variables['spectral']['u'][0], np.float64)
  cos0 = abs(u0 @ right[0]) / np.linalg.norm(u0)
  convergence = largest * (1 / cos0**2 - 1) * (singular_values[1] / largest)**200
  rounding = sn_relative_error(w, np.asarray(spectral['u'])) * largest
  tolerances.assert_within(sigma, largest, convergence + rounding, 'sigma')
  # The layer's effective kernel (its output on the identity: exactly W / sigma rounded once) has
  # spectral norm 1, to sigma's error and one rounding of each element.
  out = np.asarray(out, np.float64)
  tolerances.assert_within(np.linalg.svd(out, compute_uv=False)[0], 1.0,
                           (convergence + rounding) / largest + EPS32 / 2 * np.linalg.norm(out),
                           'spectral norm of W / sigma')


def test_evaluation_of_a_fresh_layer_reads_a_unit_u():
  """Before any update, sigma = |u W^T| for the stored (unit) u: at most the largest singular
  value. (An unnormalized initial u once gave 7.87 for a kernel whose sigma_1 is 1.31.)"""
  conv = layers.SNConv(64, (3, 3))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 16))
  variables = conv.init(jax.random.PRNGKey(0), x, update_sn=True)
  u = np.asarray(variables['spectral']['u'], np.float64)
  tolerances.assert_within(np.linalg.norm(u), 1.0, gamma_n(u.size + 2), '|u|')
  _, state = conv.apply(variables, x, update_sn=False, mutable=['intermediates'])
  sigma = float(state['intermediates']['sigma'][0])
  w = np.asarray(variables['params']['kernel'], np.float64).reshape(-1, 64)
  largest = np.linalg.svd(w, compute_uv=False)[0]
  expected = np.linalg.norm(u @ w.T) / np.linalg.norm(u)
  tolerances.assert_within(sigma, expected, sn_relative_error(w, u) * expected, 'sigma')
  assert sigma <= largest * (1 + sn_relative_error(w, u))


def test_conv_kernel_is_normalized_as_a_matrix_of_shape_fan_in_by_out():
  conv = layers.SNConv(5, (3, 3))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 4))
  variables = conv.init(jax.random.PRNGKey(0), x, update_sn=True)
  kernel = np.asarray(variables['params']['kernel'])
  u = np.asarray(variables['spectral']['u'], np.float64)
  expected_kernel = np_spectral_normalize(kernel, u).reshape(kernel.shape)
  expected = jax.lax.conv_general_dilated(x, jnp.asarray(expected_kernel, jnp.float32), (1, 1),
                                          'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  # Both convolutions sum 3 x 3 x 4 terms per output in float32, their kernels differ by the
  # rounding of the normalization (and of the reference's cast to float32): bounded by the sums
  # of absolute terms.
  kernel_error = sn_relative_error(kernel, u) + EPS32 / 2
  tolerance = (2 * gamma_n(3 * 3 * 4) + kernel_error) * tolerances.abs_conv(x, expected_kernel)
  tolerances.assert_within(conv.apply(variables, x, update_sn=False), expected, tolerance, 'conv')


def test_u_changes_in_training_and_not_in_evaluation():
  block = layers.SelfAttention()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 16))
  variables = block.init(jax.random.PRNGKey(0), x, update_sn=True)
  before = variables['spectral']
  _, trained = block.apply(variables, x, update_sn=True, mutable=['spectral'])
  _, evaluated = block.apply(variables, x, update_sn=False, mutable=['spectral'])
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


def attention_core_error(theta, phi, g, weights=None, num_blocks=1, input_errors=None):
  """Float32 error bounds of out = softmax(theta phi^T) g (and of the gradients of
  sum(weights * out) when `weights` is given) against float64, whatever the order of the sums
  (einsum, XLA's fused kernel, key blocks with an online softmax).

  Each sum of n terms is off by at most gamma_n times its absolute terms (tests/tolerances.py),
  plus the errors its operands carry (`input_errors` for theta, phi, g). A logit error e moves a
  softmax weight p by at most 2 max(e) p (the softmax ignores a common shift); exp, the row sum,
  the division and two rescales per key block add m + 3 + 2 blocks roundings.
  """
  theta, phi, g = (np.asarray(t, np.float64) for t in (theta, phi, g))
  e_theta, e_phi, e_g = input_errors or [np.zeros_like(x) for x in (theta, phi, g)]
  n, d = theta.shape[1:]
  m, c = g.shape[1:]
  t = lambda a: a.transpose(0, 2, 1)
  logits = theta @ t(phi)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  e_logits = (gamma_n(d) * np.abs(theta) @ t(np.abs(phi)) + e_theta @ t(np.abs(phi)) +
              np.abs(theta) @ t(e_phi))
  e_attn = attn * (2 * e_logits.max(-1, keepdims=True) + gamma_n(m + 3 + 2 * num_blocks))
  abs_g = np.abs(g)
  errors = {'out': e_attn @ abs_g + attn @ e_g + gamma_n(m) * attn @ abs_g}
  if weights is not None:
    w = np.abs(np.asarray(weights, np.float64))
    d_probs = np.asarray(weights, np.float64) @ t(g)
    e_d_probs = gamma_n(c) * w @ t(abs_g) + w @ t(e_g)
    delta = np.sum(attn * d_probs, -1, keepdims=True)
    e_delta = np.sum(e_attn * np.abs(d_probs) + attn * e_d_probs + gamma_n(m) * attn *
                     np.abs(d_probs), -1, keepdims=True)
    d_logits = attn * (d_probs - delta)
    e_d_logits = (e_attn * (np.abs(d_probs) + np.abs(delta)) + attn * (e_d_probs + e_delta) +
                  gamma_n(2) * attn * (np.abs(d_probs) + np.abs(delta)))
    abs_d_logits = np.abs(d_logits)
    errors.update(
        theta=e_d_logits @ np.abs(phi) + abs_d_logits @ e_phi +
        gamma_n(m) * abs_d_logits @ np.abs(phi),
        phi=t(e_d_logits) @ np.abs(theta) + t(abs_d_logits) @ e_theta +
        gamma_n(n) * t(abs_d_logits) @ np.abs(theta),
        g=t(e_attn) @ w + gamma_n(n) * t(attn) @ w)
  return errors


def attention_block_tolerance(x, variables, num_blocks=1):
  """Float32 error bound of SelfAttention's output against float64 (np_authors_attention).

  The 1x1 convs' sums (C and C/2 terms) with normalized kernels off by sn_relative_error, the
  attention core (attention_core_error), gamma o and the residual sum.
  """
  params, spectral = variables['params'], variables['spectral']
  x = np.asarray(x, np.float64)
  batch, height, width, channels = x.shape
  kernels, kernel_errors = {}, {}
  for k in ('theta', 'phi', 'g', 'o'):
    w, u = np.asarray(params[k]['kernel']), np.asarray(spectral[k]['u'], np.float64)
    kernels[k] = np_spectral_normalize(w, u)
    kernel_errors[k] = sn_relative_error(w, u)
  abs_x = np.abs(x)
  inputs, errors = {}, {}
  for name, size, pool in (('theta', channels // 8, False), ('phi', channels // 8, True),
                           ('g', channels // 2, True)):
    signed = x @ kernels[name]
    error = (gamma_n(channels) + kernel_errors[name]) * abs_x @ np.abs(kernels[name])
    if pool:  # The max of 4 values is one of them: its error is at most the largest of theirs.
      signed, error = np_max_pool_2x2(signed), np_max_pool_2x2(error)
    inputs[name], errors[name] = signed.reshape(batch, -1, size), error.reshape(batch, -1, size)
  names = ('theta', 'phi', 'g')
  core = attention_core_error(*(inputs[k] for k in names), num_blocks=num_blocks,
                              input_errors=[errors[k] for k in names])
  logits = inputs['theta'] @ inputs['phi'].transpose(0, 2, 1)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  attended = (attn @ inputs['g']).reshape(batch, height, width, channels // 2)
  e_attended = core['out'].reshape(attended.shape)
  e_o = (e_attended @ np.abs(kernels['o']) + (gamma_n(channels // 2) + kernel_errors['o']) *
         np.abs(attended) @ np.abs(kernels['o']))
  gamma_abs = abs(float(params['gamma']))
  gamma_o = gamma_abs * np.abs(attended @ kernels['o'])
  # gamma * o and x + gamma * o: two roundings.
  return gamma_abs * e_o + gamma_n(2) * (abs_x + gamma_o)


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
  # Two float32 computations: twice the bound of each against float64.
  tolerances.assert_within(fused, plain, 2 * attention_block_tolerance(x, variables),
                           'fused vs einsum')
  assert float(jnp.max(jnp.abs(fused - x))) > 1e-2  # gamma = 0.7: attention did something.


@pytest.mark.parametrize('implementation', ['fused', 'einsum'])
def test_attention_matches_numpy_authors_block(attention_case, implementation):
  x, variables = attention_case
  out = layers.SelfAttention(implementation=implementation).apply(variables, x, update_sn=False)
  expected = np_authors_attention(np.asarray(x), variables['params'], variables['spectral'])
  tolerances.assert_within(out, expected, attention_block_tolerance(x, variables), implementation)


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
  # Against float64, with float32 rounding bounds from the sums of absolute terms: the moments sum
  # n = 24 values per channel (the variance's terms (x - mean)^2 also move by 2 |x - mean| times
  # the mean's error), the normalization takes a few more roundings per element.
  x64, g64, b64 = (a.astype(np.float64) for a in (x, gamma[labels][:, None, None],
                                                  beta[labels][:, None, None]))
  n = x.size // x.shape[-1]
  mean, var = x64.mean((0, 1, 2)), x64.var((0, 1, 2))
  centred = np.abs(x64 - mean)
  mean_error = gamma_n(n) * np.abs(x64).mean((0, 1, 2))
  var_error = (gamma_n(n + 2) * (centred**2).mean((0, 1, 2)) +
               2 * mean_error * centred.mean((0, 1, 2)))

  def normalized_error(m, v, m_error, v_error):
    # y = (x - m) * gamma / sqrt(v + eps) + beta: 6 roundings, each at most u of a term.
    scale = np.abs(g64) / np.sqrt(v + 1e-5)
    return (scale * (m_error + np.abs(x64 - m) * (gamma_n(6) + v_error / (2 * (v + 1e-5)))) +
            gamma_n(6) * np.abs(b64))

  expected = (x64 - mean) / np.sqrt(var + 1e-5) * g64 + b64
  tolerances.assert_within(out, expected, normalized_error(mean, var, mean_error, var_error),
                           'training output')
  new_mean, new_var = 0.1 * mean, 0.9 + 0.1 * var
  new_mean_error = 0.1 * mean_error + gamma_n(2) * np.abs(new_mean)
  new_var_error = 0.1 * var_error + gamma_n(3) * new_var
  tolerances.assert_within(updated['batch_stats']['mean'], new_mean, new_mean_error, 'mean')
  tolerances.assert_within(updated['batch_stats']['var'], new_var, new_var_error, 'var')
  # Evaluation normalizes with the moving statistics.
  variables['batch_stats'] = updated['batch_stats']
  out_eval = bn.apply(variables, x, labels, use_running_average=True)
  tolerances.assert_within(out_eval, (x64 - new_mean) / np.sqrt(new_var + 1e-5) * g64 + b64,
                           normalized_error(new_mean, new_var, new_mean_error, new_var_error),
                           'evaluation output')


@pytest.fixture(scope='module')
def attention_operands():
  """theta [2, 40, 4], phi [2, 10, 4], g [2, 10, 16], an output weighting, einsum's results."""
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  theta = jax.random.normal(keys[0], (2, 40, 4))
  phi = jax.random.normal(keys[1], (2, 10, 4))
  g = jax.random.normal(keys[2], (2, 10, 16))
  weights = jax.random.normal(keys[3], (2, 40, 16))
  out, grads = _weighted_value_and_grads(attention.attention_einsum, weights, theta, phi, g)
  return theta, phi, g, weights, out, grads


def _weighted_value_and_grads(attend, weights, *operands):
  """attend(*operands) and the gradients of sum(weights * attend(...)), in one jit."""
  def loss(*args):
    out = attend(*args)
    return jnp.sum(weights * out), out
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(*operands)[::-1]


@pytest.mark.parametrize('block_size', [3, 5, 512])
def test_blockwise_attention_equals_einsum(attention_operands, block_size):
  """10 keys: blocks of 3 leave a padded last block, 5 gives two full ones, 512 one of 10."""
  theta, phi, g, weights, expected_out, expected_grads = attention_operands
  out, grads = _weighted_value_and_grads(
      lambda *args: attention.attention_blockwise(*args, block_size=block_size), weights, theta,
      phi, g)
  # Two float32 computations of the same sums in other orders: twice the bound of each.
  errors = attention_core_error(theta, phi, g, weights, -(-phi.shape[1] // block_size))
  tolerances.assert_within(out, expected_out, 2 * errors['out'], 'out')
  for name, got, want in zip(('theta', 'phi', 'g'), grads, expected_grads):
    tolerances.assert_within(got, want, 2 * errors[name], f'd/d{name}')


def test_blockwise_attention_keeps_bfloat16_and_float32_statistics(attention_operands):
  theta, phi, g = attention_operands[:3]
  bf16 = [x.astype(jnp.bfloat16) for x in (theta, phi, g)]
  out = attention.attention_blockwise(*bf16, block_size=4)
  assert out.dtype == jnp.bfloat16
  # Both read the same bf16 inputs, with softmax and sums in float32; the blockwise path also
  # rounds the probabilities (before p g) and the output to bf16: at most u_bf16 of each term of
  # p g and of the result, on top of the float32 bound of two computations.
  reference = attention.attention_einsum(*[x.astype(jnp.float32) for x in bf16])
  inputs = [np.asarray(x, np.float64) for x in bf16]
  logits = inputs[0] @ inputs[1].transpose(0, 2, 1)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  abs_out = attn @ np.abs(inputs[2])
  tolerance = (2 * tolerances.U_BF16 * abs_out +
               2 * attention_core_error(*inputs, num_blocks=-(-phi.shape[1] // 4))['out'])
  tolerances.assert_within(out.astype(jnp.float32), reference, tolerance, 'bf16 blockwise')


def test_auto_attention_picks_blockwise_for_many_keys_off_gpu():
  assert jax.default_backend() == 'cpu'
  assert attention.resolve_attention_impl('auto', 4096, 16, jnp.bfloat16, 512) == 'blockwise'
  assert attention.resolve_attention_impl('auto', 256, 16, jnp.float32, 512) == 'fused'
  assert attention.resolve_attention_impl('einsum', 4096, 16, jnp.float32, 512) == 'einsum'


def test_blockwise_self_attention_matches_numpy_authors_block(attention_case):
  """48 queries and 12 keys in blocks of 5: the last block is padded."""
  x, variables = attention_case
  out = layers.SelfAttention(implementation='blockwise', block_size=5).apply(
      variables, x, update_sn=False)
  expected = np_authors_attention(np.asarray(x), variables['params'], variables['spectral'])
  tolerances.assert_within(out, expected, attention_block_tolerance(x, variables, num_blocks=3),
                           'blockwise')


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
  # bf16's per-element precision (~0.4%); a bfloat16 sum would be off by far more. The error is
  # that of rounding the same float32 values to bf16, alike on every machine; a bound derived
  # from the 2048 per-element bf16 errors would also admit a bf16 sum, so 2% stays measured.
  g16, g32 = bias_grad(conv16), bias_grad(conv32)
  assert g16.dtype == jnp.float32
  np.testing.assert_allclose(g16, g32, rtol=2e-2, atol=2e-2 * float(jnp.max(jnp.abs(g32))))
