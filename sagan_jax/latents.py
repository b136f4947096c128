"""G's inputs: latent vectors z and class labels, drawn in one place for training and evaluation."""

from typing import Tuple

import jax
import jax.numpy as jnp


def sample_z(rng: jax.Array, n: int, z_dim: int, truncation: float = 0.0) -> jax.Array:
  """z ~ N(0, I) [n, z_dim]; with `truncation` > 0, N(0, I) truncated to [-truncation, truncation].

  The truncation trick (BigGAN): values outside the threshold are redrawn, trading variety for
  fidelity as the threshold shrinks.
  """
  if truncation and truncation > 0:
    return jax.random.truncated_normal(rng, -truncation, truncation, (n, z_dim), jnp.float32)
  return jax.random.normal(rng, (n, z_dim), jnp.float32)


def sample_latents(rng: jax.Array, n: int, z_dim: int, num_classes: int,
                   truncation: float = 0.0) -> Tuple[jax.Array, jax.Array]:
  """z (`sample_z`) and labels uniform over the classes, from one key."""
  z_rng, y_rng = jax.random.split(rng)
  z = sample_z(z_rng, n, z_dim, truncation)
  return z, jax.random.randint(y_rng, (n,), 0, num_classes, jnp.int32)
