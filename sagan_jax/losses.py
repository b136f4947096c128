"""Adversarial losses as pure functions of D's logits."""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from sagan_jax.errors import ConfigError


class AdversarialLoss(NamedTuple):
  d_loss: Callable[[jax.Array, jax.Array], jax.Array]  # (real_logits, fake_logits) -> scalar
  g_loss: Callable[[jax.Array], jax.Array]  # fake_logits -> scalar


def hinge_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """L_D = E[relu(1 - D(x))] + E[relu(1 + D(G(z)))] (SAGAN)."""
  return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))


def hinge_g_loss(fake_logits: jax.Array) -> jax.Array:
  """L_G = -E[D(G(z))]."""
  return -jnp.mean(fake_logits)


def non_saturating_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """The original GAN's D loss: softplus(-D(x)) + softplus(D(G(z)))."""
  return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))


def non_saturating_g_loss(fake_logits: jax.Array) -> jax.Array:
  """-log sigmoid(D(G(z)))."""
  return jnp.mean(jax.nn.softplus(-fake_logits))


def wasserstein_d_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """WGAN critic loss (Lipschitz constraint from spectral norm): E[D(G(z))] - E[D(x)]."""
  return jnp.mean(fake_logits) - jnp.mean(real_logits)


LOSSES = {
    'hinge': AdversarialLoss(hinge_d_loss, hinge_g_loss),
    'non_saturating': AdversarialLoss(non_saturating_d_loss, non_saturating_g_loss),
    'wasserstein': AdversarialLoss(wasserstein_d_loss, hinge_g_loss),
}


def get_adversarial_loss(name: str) -> AdversarialLoss:
  if name not in LOSSES:
    raise ConfigError(f"unknown train.loss '{name}': set --config.train.loss to one of "
                      f'{sorted(LOSSES)}')
  return LOSSES[name]
