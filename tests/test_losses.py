"""Adversarial losses on hand-computed cases."""

import jax.numpy as jnp
import numpy as np
import pytest

from sagan_jax import losses
from sagan_jax.errors import ConfigError
from tests.tolerances import EPS32

# The losses below are float32 means of a few non-negative terms (their sum of absolute terms is
# the result itself: at most 4 roundings, gamma_4 < 2.5 eps relative) and elementary functions
# (XLA's exp and log1p, each within a few ulps): 8 eps (~1e-6) relative on any CPU. A wrong
# constant, sign or term is off by far more.
RTOL = 8 * EPS32


def test_hinge_losses_by_hand():
  real = jnp.array([2.0, 0.5, -1.0])  # relu(1 - x): 0, 0.5, 2 -> mean 2.5 / 3
  fake = jnp.array([-2.0, 0.0, 1.0])  # relu(1 + x): 0, 1, 2 -> mean 1
  np.testing.assert_allclose(losses.hinge_d_loss(real, fake), 2.5 / 3 + 1.0, rtol=RTOL)
  np.testing.assert_allclose(losses.hinge_g_loss(fake), 1.0 / 3, rtol=RTOL)  # -mean(-2, 0, 1)


def test_hinge_d_loss_is_zero_beyond_the_margins():
  assert float(losses.hinge_d_loss(jnp.array([1.0, 3.0]), jnp.array([-1.0, -5.0]))) == 0.0


def test_non_saturating_and_wasserstein_by_hand():
  real, fake = jnp.array([0.0]), jnp.array([0.0])
  np.testing.assert_allclose(losses.non_saturating_d_loss(real, fake), 2 * np.log(2), rtol=RTOL)
  np.testing.assert_allclose(losses.non_saturating_g_loss(jnp.array([np.log(3.0)])),
                             np.log(4.0 / 3.0), rtol=RTOL)  # -log sigmoid(log 3) = -log(3/4)
  np.testing.assert_allclose(losses.wasserstein_d_loss(jnp.array([3.0, 1.0]), jnp.array([0.5])),
                             0.5 - 2.0, rtol=RTOL)


def test_unknown_loss_names_the_choices():
  with pytest.raises(ConfigError, match=r"unknown train.loss 'lsgan'.*--config.train.loss"):
    losses.get_adversarial_loss('lsgan')
