"""The GAN train state: both networks, their mutable collections, optimizers and G's EMA."""

from typing import Any

import flax.struct
import jax
import optax

PyTree = Any


@flax.struct.dataclass
class GANTrainState:
  """Everything a train step reads and writes; a pytree (optimizers are static fields).

  Attributes:
    step: G steps taken.
    rng: the run's key; each step folds in `step` (never split-and-carried).
    g_params, d_params: trainable parameters.
    g_state: G's mutable collections ({'spectral': u vectors, 'batch_stats': BN moving stats}).
    d_state: D's mutable collections ({'spectral': u vectors}).
    g_opt_state, d_opt_state: Adam states.
    ema_g_params: exponential moving average of g_params.
    g_tx, d_tx: the two optax optimizers (two time-scale update rule).
  """
  step: jax.Array
  rng: jax.Array
  g_params: PyTree
  d_params: PyTree
  g_state: PyTree
  d_state: PyTree
  g_opt_state: optax.OptState
  d_opt_state: optax.OptState
  ema_g_params: PyTree
  g_tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  d_tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  def generator_params(self, use_ema: bool) -> PyTree:
    """G's parameters to sample or evaluate with: the EMA (use_ema) or the raw ones."""
    return self.ema_g_params if use_ema else self.g_params
