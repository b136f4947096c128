"""Consistency regularization of D (sagan_jax.regularizers): the term, its gradient, the config and
a D step that carries it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sagan_jax import augment
from sagan_jax import config_check
from sagan_jax import losses
from sagan_jax import models
from sagan_jax import regularizers
from sagan_jax import sharding
from sagan_jax import train
from sagan_jax import train_state
from sagan_jax.errors import ConfigError
from tests.conftest import tiny_config
from tests.tolerances import EPS32, gamma

RNG = jax.random.PRNGKey(5)


def _linear_d(w):
  """A discriminator linear in the image: logit = sum(x * w) + label, float32."""
  return lambda x, y: jnp.sum(x * w, axis=(1, 2, 3)) + y.astype(jnp.float32)


def _inputs(w, num=8, seed=0):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.uniform(-1, 1, (2 * num, 8, 8, 1)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 10, 2 * num).astype(np.int32))
  d_fn = _linear_d(w)
  return train.LossInputs(w, images, labels, d_fn(images, labels), d_fn)


@pytest.mark.parametrize('real_weight,fake_weight', [(10.0, 0.0), (10.0, 5.0), (0.0, 3.0)])
def test_term_is_the_weighted_mean_squared_change_of_the_logits(real_weight, fake_weight):
  w = jnp.asarray(np.random.default_rng(1).normal(size=(8, 8, 1)).astype(np.float32))
  inputs = _inputs(w)
  term, metrics = regularizers.consistency(real_weight, fake_weight, 'translation')(inputs, RNG)
  # The same shifts in float64: the regularizer transforms the first 8 images (CR) or all 16.
  count = 16 if fake_weight else 8
  moved = np.asarray(augment.translation(jax.random.fold_in(RNG, 0), inputs.images[:count]),
                     np.float64)
  x = np.asarray(inputs.images[:count], np.float64)
  wd = np.asarray(w, np.float64)
  change = np.sum((moved - x) * wd, axis=(1, 2, 3))
  real, fake = np.mean(change[:8] ** 2), np.mean(change[8:] ** 2) if fake_weight else 0.0
  expected = real_weight * real + fake_weight * fake
  # Each logit sums 64 products and a label: off by delta at most, their difference by 2 delta
  # and a rounding; its square by 2 |change| e + e^2; then a mean of 8 or 16, and the weights.
  abs_logit = np.sum(np.abs(np.concatenate([moved, x])) * np.abs(wd), axis=(1, 2, 3)) + 10
  delta = gamma(66) * np.max(abs_logit)
  e = 2 * delta + EPS32 * np.max(np.abs(change))
  bound = 2 * np.max(np.abs(change)) * e + e * e + gamma(17) * np.max(change ** 2)
  assert abs(float(term) - expected) <= (real_weight + fake_weight) * bound + gamma(3) * expected
  assert abs(float(metrics['train/d_consistency_real']) - real) <= bound
  assert ('train/d_consistency_fake' in metrics) == bool(fake_weight)
  assert real > 0 and expected > 0


def test_gradient_flows_through_both_logits_and_vanishes_for_invariant_images():
  w = jnp.asarray(np.random.default_rng(2).normal(size=(8, 8, 1)).astype(np.float32))
  reg = regularizers.consistency(10.0, 0.0, 'translation')

  def term(w, images):
    d_fn = _linear_d(w)
    labels = jnp.zeros(images.shape[0], jnp.int32)
    return reg(train.LossInputs(w, images, labels, d_fn(images, labels), d_fn), RNG)[0]

  images = _inputs(w).images
  grad = np.asarray(jax.grad(term)(w, images), np.float64)
  # d/dw 10 mean((T(x) - x) . w)^2 = 20 mean((T(x) - x) . w) (T(x) - x): through both logits.
  moved = np.asarray(augment.translation(jax.random.fold_in(RNG, 0), images[:8]), np.float64)
  diff = moved - np.asarray(images[:8], np.float64)
  change = np.sum(diff * np.asarray(w, np.float64), axis=(1, 2, 3))
  expected = 20 * np.mean(change[:, None, None, None] * diff, axis=0)
  atol = gamma(64 + 16) * 20 * np.max(np.abs(diff)) * np.sum(np.abs(diff)) * np.max(np.abs(w))
  np.testing.assert_allclose(grad, expected, rtol=0, atol=atol)
  assert np.max(np.abs(grad)) > 0
  # Images all zeros are unchanged by any shift: no term, no gradient.
  zeros = jnp.zeros_like(images)
  assert float(term(w, zeros)) == 0.0
  assert not np.any(np.asarray(jax.grad(term)(w, zeros)))


def test_config_turns_it_on_and_names_each_wrong_setting():
  config = tiny_config()
  assert regularizers.d_regularizers_from_config(config.train) == ()
  assert train.hooks_from_config(config).d_regularizers == ()
  config.train.consistency_weight = 10.0
  config_check.check_config(config)
  assert len(train.hooks_from_config(config).d_regularizers) == 1
  config.train.consistency_augment = 'translation,zoom'
  with pytest.raises(ConfigError, match="train.consistency_augment policy 'zoom'.*"
                     "--config.train.consistency_augment"):
    config_check.check_config(config)
  config.train.consistency_augment = ''
  with pytest.raises(ConfigError, match='train.consistency_augment is empty'):
    config_check.check_config(config)
  config.train.consistency_augment = 'translation'
  config.train.consistency_fake_weight = -1.0
  with pytest.raises(ConfigError, match='train.consistency_fake_weight=-1.0 is out of range'):
    config_check.check_config(config)


def test_d_step_with_consistency_regularization_adds_the_term_to_d_loss():
  """The tiny config's D step (no attention, one device: a quick compile) with bCR: D's loss is
  the hinge loss of the logits plus the weighted terms the step reports. A probe regularizer
  after the config's reports the hinge loss of the same logits, in the same program."""
  config = tiny_config()
  config.model.g_attention = config.model.d_attention = ()
  config.train.consistency_weight = 10.0
  config.train.consistency_fake_weight = 5.0
  config_check.check_config(config)
  generator, discriminator = models.create_models(config)
  mesh = sharding.create_mesh(jax.devices()[:1])
  state = train_state.create_sharded_train_state(config, generator, discriminator,
                                                 jax.random.PRNGKey(0), mesh)
  rng = np.random.default_rng(0)
  shape = (1, 8, 32, 32, 1)
  batch = sharding.make_global_batch(
      {'image': rng.uniform(-1, 1, shape).astype(np.float32),
       'label': rng.integers(0, 10, shape[:2]).astype(np.int32)}, mesh)
  hinge_loss = losses.get_adversarial_loss('hinge')

  def probe(inputs, rng):
    del rng
    return jnp.zeros(()), {'probe/hinge': hinge_loss.d_loss(*jnp.split(inputs.logits, 2))}

  hooks = train.StepHooks(d_regularizers=train.hooks_from_config(config).d_regularizers + (probe,))
  step = train.compile_train_step(train.create_train_step(
      config, generator, discriminator, mesh, phases=('d',), hooks=hooks), mesh)
  metrics = jax.device_get(step(state, batch)[1])
  real, fake = metrics['train/d_consistency_real'], metrics['train/d_consistency_fake']
  hinge = metrics['probe/hinge']
  assert real > 0 and fake > 0
  term = 10.0 * real + 5.0 * fake
  # The hinge loss's two means of 8 may be summed in another order; then 4 roundings of adds
  # and products.
  bound = gamma(8 + 4) * (abs(hinge) + term)
  assert abs(metrics['train/d_loss'] - (hinge + term)) <= bound
  assert np.isfinite(metrics['train/d_grad_norm']) and bool(metrics['train/all_finite'])
