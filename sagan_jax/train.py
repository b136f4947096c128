"""The train state factory and the compiled SAGAN train step (n D steps, then one G step)."""

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from sagan_jax import losses
from sagan_jax import models
from sagan_jax import sharding
from sagan_jax.layers import SPECTRAL
from sagan_jax.train_state import GANTrainState

Batch = Dict[str, jax.Array]
Metrics = Dict[str, jax.Array]


@functools.lru_cache(maxsize=None)
def _adam(learning_rate: float, b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  # Cached: the optimizers are static fields of the state, so equal settings must give the same
  # objects, or every new state (fresh, restored) would compile the step again.
  return optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)


def create_optimizers(train_config) -> Tuple[optax.GradientTransformation, ...]:
  """Adam for G and for D with their own learning rates (two time-scale update rule)."""
  hyper = (train_config.beta1, train_config.beta2, train_config.adam_eps)
  return _adam(train_config.g_lr, *hyper), _adam(train_config.d_lr, *hyper)


def sample_latents(rng: jax.Array, batch_size: int, z_dim: int, num_classes: int):
  """z ~ N(0, I) and fake labels uniform over the classes."""
  z_rng, y_rng = jax.random.split(rng)
  z = jax.random.normal(z_rng, (batch_size, z_dim), jnp.float32)
  labels = jax.random.randint(y_rng, (batch_size,), 0, num_classes, jnp.int32)
  return z, labels


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


def create_train_step(config, generator: models.Generator, discriminator: models.Discriminator,
                      mesh: Optional[Mesh] = None) -> Callable[..., Tuple[GANTrainState, Metrics]]:
  """Returns the pure `train_step(state, batch) -> (state, metrics)`.

  `batch` holds 'image' [d_steps, B, H, W, C] in [-1, 1] and 'label' [d_steps, B]. Each D step
  passes real and fake images through D in one forward, so D's spectral vectors advance once per D
  step. G's spectral vectors and BN statistics advance in the G step only: the D steps run G in
  training mode (batch statistics) and drop its state updates. Randomness is
  fold_in(state.rng, state.step), so a step's numbers do not depend on how it is sharded.
  """
  adversarial = losses.get_adversarial_loss(config.train.loss)
  train_config, num_classes = config.train, config.data.num_classes
  z_dim = config.model.z_dim
  g_mutable = ['batch_stats', SPECTRAL]

  def constrain(x):
    if mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, sharding.data_sharding(mesh))

  def latents(rng, batch_size):
    z, labels = sample_latents(rng, batch_size, z_dim, num_classes)
    return constrain(z), constrain(labels)

  def d_step(state: GANTrainState, real, real_labels, rng):
    z, fake_labels = latents(rng, real.shape[0])
    fake, _ = generator.apply({'params': state.g_params, **state.g_state}, z, fake_labels,
                              train=True, mutable=g_mutable)
    fake = jax.lax.stop_gradient(fake)
    images = jnp.concatenate([real, fake.astype(real.dtype)], axis=0)
    labels = jnp.concatenate([real_labels, fake_labels], axis=0)

    def loss_fn(d_params):
      logits, d_state = discriminator.apply({'params': d_params, **state.d_state}, images, labels,
                                            update_sn=True, mutable=[SPECTRAL])
      real_logits, fake_logits = jnp.split(logits, 2)
      loss = adversarial.d_loss(real_logits, fake_logits)
      return loss, (d_state, real_logits, fake_logits)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (d_state, real_logits, fake_logits)), grads = grad_fn(state.d_params)
    updates, d_opt_state = state.d_tx.update(grads, state.d_opt_state, state.d_params)
    state = state.replace(d_params=optax.apply_updates(state.d_params, updates),
                          d_state=dict(d_state), d_opt_state=d_opt_state)
    metrics = {'train/d_loss': loss, 'train/d_real': jnp.mean(real_logits),
               'train/d_fake': jnp.mean(fake_logits), 'train/d_grad_norm': optax.global_norm(grads)}
    return state, metrics

  def g_step(state: GANTrainState, batch_size, rng):
    z, labels = latents(rng, batch_size)

    def loss_fn(g_params):
      fake, g_state = generator.apply({'params': g_params, **state.g_state}, z, labels,
                                      train=True, mutable=g_mutable)
      logits = discriminator.apply({'params': state.d_params, **state.d_state}, fake, labels,
                                   update_sn=False)
      return adversarial.g_loss(logits), g_state

    (loss, g_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.g_params)
    updates, g_opt_state = state.g_tx.update(grads, state.g_opt_state, state.g_params)
    g_params = optax.apply_updates(state.g_params, updates)
    # Before ema_start_step the EMA tracks G exactly (decay 0).
    decay = jnp.where(state.step >= train_config.ema_start_step, train_config.ema_decay, 0.0)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_g_params, g_params)
    state = state.replace(g_params=g_params, g_state=dict(g_state), g_opt_state=g_opt_state,
                          ema_g_params=ema)
    return state, {'train/g_loss': loss, 'train/g_grad_norm': optax.global_norm(grads)}

  def train_step(state: GANTrainState, batch: Batch) -> Tuple[GANTrainState, Metrics]:
    step_rng = jax.random.fold_in(state.rng, state.step)
    d_steps = batch['image'].shape[0]
    metrics = {}
    for i in range(d_steps):
      state, metrics = d_step(state, batch['image'][i], batch['label'][i],
                              jax.random.fold_in(step_rng, i))
    state, g_metrics = g_step(state, batch['image'].shape[1], jax.random.fold_in(step_rng, d_steps))
    metrics = {**metrics, **g_metrics}
    # One flag for the host's non-finite guard: every loss and every parameter of G and D.
    finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(
        (metrics, state.g_params, state.d_params))]
    metrics['train/all_finite'] = jnp.all(jnp.stack(finite))
    return state.replace(step=state.step + 1), metrics

  return train_step


def compile_train_step(train_step: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
  """jax.jit over `mesh`: state replicated and donated, the batch sharded over 'data'."""
  replicated = sharding.replicated(mesh)
  return jax.jit(train_step, in_shardings=(replicated, sharding.step_batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def create_sharded_train_state(config, generator: models.Generator,
                               discriminator: models.Discriminator, rng: jax.Array,
                               mesh: Mesh) -> GANTrainState:
  """create_train_state compiled with replicated outputs on `mesh`.

  The state then has exactly the type the compiled step returns, so the step compiles once.
  """
  create = functools.partial(create_train_state, config, generator, discriminator)
  return jax.jit(create, out_shardings=sharding.replicated(mesh))(rng)
