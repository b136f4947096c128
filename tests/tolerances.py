"""Tolerances derived from the computation being compared, not tuned on one machine.

A float sum s = t_1 + ... + t_n comes out differently for every order of additions, and the order
depends on the CPU's vector width, the thread count and how the work is split over devices and
processes. Whatever the order, the rounding error is bounded by the sum of absolute terms:

  |fl(s) - s| <= gamma_n * sum_k |t_k|,  gamma_n = n u / (1 - n u)      (worst case)
  |fl(s) - s| <= lambda * sqrt(n) * u * sum_k |t_k|                      (probabilistic)

with u = eps / 2 the unit roundoff (Higham, Accuracy and Stability of Numerical Algorithms, 2nd
ed., eq. 4.4; Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019, for the second, which holds
with probability at least 1 - 2 n exp(-lambda^2 / 2) when the rounding errors are independent and
of mean zero). Two orders differ by at most twice the bound. The bound scales with the terms, not
with the result, so it stays meaningful under heavy cancellation (a gradient that is zero in exact
arithmetic comes out as noise of the size u * sum |t_k|), where a relative tolerance fails and an
absolute one is a guess about the machine.

Short reductions (a conv's receptive field, a matmul row) use the worst case. Whole train steps
use the probabilistic bound with n the longest reduction of the step: each term there was itself
computed by reductions (the layers before, the batch norms' statistics), and the worst case over
10^4 terms and tens of layers would be vacuous.
"""

from typing import Any, Callable, Dict, NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sagan_jax import layers

EPS32 = float(np.finfo(np.float32).eps)  # 2^-23: float32's unit roundoff is EPS32 / 2.
EPS64 = float(np.finfo(np.float64).eps)  # 2^-52.
U_BF16 = 2.0 ** -8  # bfloat16 keeps 8 significant bits: eps 2^-7, unit roundoff 2^-8.
# lambda = 7: 2 n exp(-49 / 2) < 1e-6 for every reduction length in these tests (n <= 2 * 10^4).
LAMBDA = 7.0


def gamma(n: int, eps: float = EPS32) -> float:
  """gamma_n = n u / (1 - n u): the worst-case relative rounding bound of n operations."""
  nu = n * eps / 2
  assert nu < 0.5, n
  return nu / (1 - nu)


def probabilistic_sum_bound(abs_sum, n: int, eps: float = EPS32, lam: float = LAMBDA):
  """lambda sqrt(n) u sum|t_k|: the rounding error of a sum of n terms, in any order."""
  return lam * np.sqrt(n) * eps / 2 * np.asarray(abs_sum, np.float64)


def abs_matmul(a, b) -> np.ndarray:
  """sum_k |a_ik| |b_kj|: the sum of absolute terms of each element of a @ b, in float64."""
  return np.abs(np.asarray(a, np.float64)) @ np.abs(np.asarray(b, np.float64))


def abs_conv(x, kernel) -> np.ndarray:
  """The sum of absolute terms of each output of a stride-1 SAME NHWC/HWIO convolution."""
  x, kernel = np.abs(np.asarray(x, np.float64)), np.abs(np.asarray(kernel, np.float64))
  kh, kw = kernel.shape[:2]
  top, left = (kh - 1) // 2, (kw - 1) // 2
  padded = np.pad(x, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
  height, width = x.shape[1:3]
  out = np.zeros(x.shape[:3] + kernel.shape[3:])
  for i in range(kh):
    for j in range(kw):
      out += padded[:, i:i + height, j:j + width] @ kernel[i, j]
  return out


def assert_within(actual, expected, atol, err_msg: str = '') -> None:
  """|actual - expected| <= atol elementwise (atol broadcasts), naming the worst element."""
  actual, expected, atol = np.broadcast_arrays(
      *(np.asarray(a, np.float64) for a in (actual, expected, atol)))
  error = np.abs(actual - expected)
  bad = ~(error <= atol)  # NaN fails too.
  if np.any(bad):
    worst = np.unravel_index(np.argmax(np.where(bad, error - atol, -np.inf)), bad.shape)
    raise AssertionError(
        f'{err_msg}: {int(bad.sum())} of {bad.size} elements beyond the derived tolerance; '
        f'worst at {worst}: actual {actual[worst]!r}, expected {expected[worst]!r}, '
        f'|difference| {error[worst]:.3g} > tolerance {atol[worst]:.3g}')


# ----------------------------------------------------------------------------------------------
# Sums of absolute terms in a SAGAN train step, from the inputs and output cotangents of its layers.

_TRACED = (layers.SNConv, layers.SNDense, layers.SNEmbed, layers.ConditionalBatchNorm,
           layers.SelfAttention)


class LayerRecord(NamedTuple):
  """One layer call: the module (its fields), array arguments, output and d loss / d output."""
  module: Any
  inputs: Tuple[np.ndarray, ...]
  output: np.ndarray
  cotangent: np.ndarray


def trace_layers(loss_fn: Callable[..., jax.Array], params) -> Dict[str, LayerRecord]:
  """Records every SAGAN layer call of `loss_fn(params, traced)`, keyed 'name/module/path'.

  `loss_fn` runs a network as `traced(name, fn)` (fn() applies it); a zero added to each layer's
  output gives the cotangent there. Jitted: a few seconds per step on 2 cores.
  """
  modules = {}

  def run(perturbations, captured):
    def traced(name, fn):
      def interceptor(next_fn, args, kwargs, context):
        out = next_fn(*args, **kwargs)
        if context.method_name != '__call__' or not isinstance(context.module, _TRACED):
          return out
        key = '/'.join((name,) + tuple(context.module.path))
        modules[key] = context.module
        captured[key] = (tuple(a for a in args if isinstance(a, jax.Array)), out)
        return out if perturbations is None else out + perturbations[key]
      with nn.intercept_methods(interceptor):
        return fn()
    return traced

  def output_shapes(params):
    captured = {}
    loss_fn(params, run(None, captured))
    return {key: out for key, (_, out) in captured.items()}

  shapes = jax.eval_shape(output_shapes, params)

  def perturbed_loss(perturbations, params):
    captured = {}
    return loss_fn(params, run(perturbations, captured)), captured

  zeros = {key: jnp.zeros(s.shape, s.dtype) for key, s in shapes.items()}
  cotangents, captured = jax.device_get(
      jax.jit(jax.grad(perturbed_loss, has_aux=True))(zeros, params))
  return {key: LayerRecord(modules[key], tuple(np.asarray(a) for a in captured[key][0]),
                           np.asarray(captured[key][1]), np.asarray(cotangents[key]))
          for key in shapes}


def longest_reduction(records: Dict[str, LayerRecord]) -> int:
  """The most terms any batch-and-space sum over a layer's output has: batch * height * width."""
  return max(r.output.size // r.output.shape[-1] for r in records.values() if r.output.ndim > 1)


def _subtree(tree, path: str):
  for name in path.split('/'):
    tree = tree[name]
  return tree


def _normalize(x: np.ndarray) -> np.ndarray:
  return x / np.sqrt(np.sum(x * x))


def _spectral_matrix(module, param: np.ndarray) -> np.ndarray:
  """The [fan_in, fan_out] matrix layers.spectral_normalize sees for a module's weight."""
  if isinstance(module, layers.SNEmbed):
    return param.T
  return param.reshape(-1, param.shape[-1])


def spectral_vectors(matrix: np.ndarray, u_before: np.ndarray, update: bool):
  """(u, v, sigma) of layers.spectral_normalize in float64: one power iteration if `update`."""
  v = _normalize(u_before @ matrix.T)
  u = _normalize(v @ matrix) if update else u_before
  return u, v, (v @ matrix @ u.T).item()


def _through_spectral_norm(s_hat: np.ndarray, matrix: np.ndarray, u, v, sigma) -> np.ndarray:
  """Absolute terms of dL/dW from those of dL/dW_hat, W_hat = W / sigma(W).

  dL/dW = (dL/dW_hat - <dL/dW_hat, W_hat> v^T u) / sigma (u and v are constants).
  """
  rank_one = np.abs(v).T @ np.abs(u) * np.sum(s_hat * np.abs(matrix)) / sigma
  return (s_hat + rank_one) / sigma


def gradient_abs_terms(records: Dict[str, LayerRecord], name: str, params, spectral,
                       update_sn: bool) -> Dict[str, np.ndarray]:
  """{'module/path/param': sum of |terms| of each element of dL/dparam} for network `name`.

  `params` and `spectral` are the network's before the step; `update_sn` whether its forward ran
  a power iteration. The terms are those of the last reduction (over batch and space, or over
  the examples of a class) of the chain rule.
  """
  out = {}
  prefix = name + '/'
  for key, record in records.items():
    if not key.startswith(prefix):
      continue
    path, module = key[len(prefix):], record.module
    dy = np.abs(record.cotangent.astype(np.float64))
    param = {k: np.asarray(v, np.float64) for k, v in _subtree(params, path).items()
             if not isinstance(v, dict)}
    if isinstance(module, layers.SelfAttention):
      o = np.abs(records[key + '/o'].output.astype(np.float64))
      out[path + '/gamma'] = np.sum(o * dy)
      continue
    if isinstance(module, layers.ConditionalBatchNorm):
      x = record.inputs[0].astype(np.float64)
      x_hat = np.abs(x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + module.epsilon)
      gamma_terms, beta_terms = (x_hat * dy).sum((1, 2)), dy.sum((1, 2))
      if module.num_classes is None:
        out[path + '/gamma'], out[path + '/beta'] = gamma_terms.sum(0), beta_terms.sum(0)
      else:
        one_hot = np.eye(module.num_classes)[record.inputs[1]]
        out[path + '/gamma'], out[path + '/beta'] = one_hot.T @ gamma_terms, one_hot.T @ beta_terms
      continue
    if isinstance(module, layers.SNEmbed):
      weight_name = 'embedding'
      s_hat = np.zeros_like(param[weight_name])
      np.add.at(s_hat, record.inputs[0], dy)  # The lookup's gradient adds rows per class.
    else:
      weight_name = 'kernel'
      x = jnp.asarray(np.abs(record.inputs[0]), jnp.float32)
      if isinstance(module, layers.SNConv):
        conv = lambda w, x=x: jax.lax.conv_general_dilated(
            x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        s_hat = np.asarray(jax.vjp(conv, jnp.zeros(param['kernel'].shape, jnp.float32))[1](
            jnp.asarray(dy, jnp.float32))[0], np.float64)
      else:
        s_hat = np.asarray(x, np.float64).T @ dy
      if 'bias' in param:
        out[path + '/bias'] = dy.reshape(-1, dy.shape[-1]).sum(0)
    matrix = _spectral_matrix(module, param[weight_name])
    u, v, sigma = spectral_vectors(matrix, np.asarray(_subtree(spectral, path)['u'], np.float64),
                                   update_sn)
    terms = _through_spectral_norm(_spectral_matrix(module, s_hat), matrix, u, v, sigma)
    out[path + '/' + weight_name] = (terms.T if isinstance(module, layers.SNEmbed)
                                     else terms.reshape(param[weight_name].shape))
  return out


def power_iteration_abs_terms(records: Dict[str, LayerRecord], name: str, params,
                              spectral) -> Dict[str, np.ndarray]:
  """{'module/path/u': absolute terms of each component of the new u} of one power iteration.

  u = v W / |v W|: the terms of (v W)_j are |v_i| |W_ij|, relative to |v W|; the norm's own
  rounding moves u by a relative amount, counted as |u_j|.
  """
  out = {}
  for key, record in records.items():
    if not key.startswith(name + '/') or isinstance(
        record.module, (layers.ConditionalBatchNorm, layers.SelfAttention)):
      continue
    path = key[len(name) + 1:]
    weight = np.asarray(_subtree(params, path)['embedding' if isinstance(
        record.module, layers.SNEmbed) else 'kernel'], np.float64)
    matrix = _spectral_matrix(record.module, weight)
    u, v, _ = spectral_vectors(matrix, np.asarray(_subtree(spectral, path)['u'], np.float64),
                               True)
    out[path + '/u'] = np.abs(v) @ np.abs(matrix) / np.linalg.norm(v @ matrix) + np.abs(u)
  return out


def batch_stats_abs_terms(records: Dict[str, LayerRecord], name: str,
                          batch_stats) -> Dict[str, np.ndarray]:
  """{'module/path/mean' or '/var': absolute terms of each new moving statistic of the BNs}.

  mean' = m mean + (1 - m) E[x], var' = m var + (1 - m) E[(x - E[x])^2], m the momentum.
  """
  out = {}
  for key, record in records.items():
    if not key.startswith(name + '/') or not isinstance(record.module,
                                                        layers.ConditionalBatchNorm):
      continue
    path, m = key[len(name) + 1:], record.module.momentum
    x = record.inputs[0].astype(np.float64)
    old = _subtree(batch_stats, path)
    centred = np.abs(x - x.mean((0, 1, 2)))
    out[path + '/mean'] = m * np.abs(old['mean']) + (1 - m) * np.abs(x).mean((0, 1, 2))
    # An error dx in x (counted relative to |x|) moves the term (x - E[x])^2 by 2 |x - E[x]| dx.
    out[path + '/var'] = m * np.abs(old['var']) + (1 - m) * (
        centred**2 + 2 * centred * np.abs(x)).mean((0, 1, 2))
  return out


def logit_abs_terms(records: Dict[str, LayerRecord], name: str, params, spectral,
                    update_sn: bool) -> np.ndarray:
  """Per example, the absolute terms of D's logit: linear(h) + <embed(y), h>."""
  linear = records[name + '/linear']
  h = np.abs(linear.inputs[0].astype(np.float64))
  kernel = np.asarray(params['linear']['kernel'], np.float64)
  sigma = spectral_vectors(kernel, np.asarray(spectral['linear']['u'], np.float64), update_sn)[2]
  embedded = np.abs(records[name + '/embed'].output.astype(np.float64))
  return (h @ np.abs(kernel / sigma))[:, 0] + np.abs(float(params['linear']['bias'][0])) + np.sum(
      embedded * h, axis=-1)
