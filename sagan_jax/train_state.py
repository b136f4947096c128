"""The GAN train state: both networks, their mutable collections, optimizers and G's EMA.

`create_train_state` builds a fresh one; `create_sharded_train_state` builds it already laid out
as the compiled train step (sagan_jax.train) returns it.
"""

import functools
from typing import Any, Tuple

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from sagan_jax import models
from sagan_jax import sharding

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


@functools.lru_cache(maxsize=None)
def _adam(learning_rate: float, b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  # Cached: the optimizers are static fields of the state, so equal settings must give the same
  # objects, or every new state (fresh, restored) would compile the step again.
  return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)


def create_optimizers(train_config) -> Tuple[optax.GradientTransformation, ...]:
  """Adam for G and for D with their own learning rates (two time-scale update rule)."""
  hyper = (train_config.beta1, train_config.beta2, train_config.adam_eps)
  return _adam(train_config.g_lr, *hyper), _adam(train_config.d_lr, *hyper)


def create_train_state(config, generator: models.Generator, discriminator: models.Discriminator,
                       rng: jax.Array) -> GANTrainState:
  """Initializes both networks, their optimizers and G's EMA (a copy of G at step 0)."""
  g_rng, d_rng, run_rng = jax.random.split(rng, 3)
  res, channels = config.data.resolution, config.data.channels
  z = jnp.zeros((2, config.model.z_dim), jnp.float32)
  labels = jnp.zeros((2,), jnp.int32)
  g_vars = generator.init(g_rng, z, labels, train=True)
  d_vars = discriminator.init(d_rng, jnp.zeros((2, res, res, channels)), labels, update_sn=True)
  g_params = g_vars.pop('params')
  d_params = d_vars.pop('params')
  g_vars.pop('intermediates', None)
  d_vars.pop('intermediates', None)
  g_tx, d_tx = create_optimizers(config.train)
  return GANTrainState(
      step=jnp.zeros((), jnp.int32), rng=run_rng, g_params=g_params, d_params=d_params,
      g_state=dict(g_vars), d_state=dict(d_vars), g_opt_state=g_tx.init(g_params),
      d_opt_state=d_tx.init(d_params), ema_g_params=jax.tree.map(jnp.copy, g_params),
      g_tx=g_tx, d_tx=d_tx)


def create_sharded_train_state(config, generator: models.Generator,
                               discriminator: models.Discriminator, rng: jax.Array,
                               mesh: Mesh) -> GANTrainState:
  """create_train_state compiled with replicated outputs on `mesh`.

  The state then has exactly the type the compiled step returns, so the step compiles once.
  """
  create = functools.partial(create_train_state, config, generator, discriminator)
  return jax.jit(create, out_shardings=sharding.replicated(mesh))(rng)
