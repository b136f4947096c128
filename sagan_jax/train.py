"""The train state factory and the compiled SAGAN train step (n D steps, then one G step)."""

import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from sagan_jax import losses
from sagan_jax import models
from sagan_jax import sharding
from sagan_jax.errors import ConfigError
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


def lr_scale_fn(train_config) -> Optional[Callable[[jax.Array], jax.Array]]:
  """The learning-rate factor of a G step (train.lr_decay_start_step), or None when constant.

  From step `lr_decay_start_step` (G steps) on, both learning rates fall linearly to reach zero at
  `num_steps` (the last step still moves by 1 / (num_steps - start) of the full rate). Before it,
  and with 0 (the paper, the default), the rates are constant. The D steps of a G step share its
  factor. Scaling Adam's update is scaling its learning rate, so the optimizer states are the
  same with and without decay: a run can turn it on when resumed.
  """
  start, num_steps = train_config.get('lr_decay_start_step', 0), train_config.num_steps
  if start < 0:
    raise ConfigError(f'train.lr_decay_start_step={start}: use 0 (constant learning rates) or the '
                      f'G step at which the decay to zero at train.num_steps={num_steps} begins')
  if not start or start >= num_steps:
    return None

  def scale(step: jax.Array) -> jax.Array:
    return jnp.clip((num_steps - step) / (num_steps - start), 0.0, 1.0).astype(jnp.float32)

  return scale


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


def split_micro_batches(x: jax.Array, num_micro: int) -> jax.Array:
  """[B, ...] -> [num_micro, B / num_micro, ...]; micro-batch i holds examples i, i + k, i + 2k...

  Strided rather than contiguous: with B sharded in contiguous chunks over the devices, row r of
  the [B / k, k] view holds examples r k ... r k + k - 1, all on one device, so every micro-batch
  keeps each device's own examples and nothing moves between devices.
  """
  batch = x.shape[0]
  if batch % num_micro:
    raise ValueError(f'batch {batch} does not split into {num_micro} micro-batches')
  return jnp.swapaxes(x.reshape(batch // num_micro, num_micro, *x.shape[1:]), 0, 1)


def _reduce_micro_batches(stacked: Any) -> Any:
  """Combines the per-micro-batch outputs stacked on axis 0.

  Spectral vectors come out equal from every micro-batch (the power iteration reads only W and
  the old u), so the last is kept; everything else (losses, logit means, BN moving statistics) is
  averaged.
  """
  def reduce(path, x):
    if any(getattr(key, 'key', None) == SPECTRAL for key in path):
      return x[-1]
    return jnp.mean(x, axis=0)
  return jax.tree_util.tree_map_with_path(reduce, stacked)


def accumulate_gradients(loss_fn: Callable[..., Any], params: Any, batch: Any, num_micro: int,
                         constrain: Callable[[jax.Array], jax.Array] = lambda x: x):
  """value_and_grad of `loss_fn(params, batch) -> (loss, aux)` averaged over micro-batches.

  With num_micro > 1 the leaves of `batch` ([B, ...]) are split by `split_micro_batches` and a
  lax.scan (compile time independent of num_micro) sums the gradients; the loss and the aux
  outputs are combined by `_reduce_micro_batches`. Equal micro-batch sizes make the mean of the
  micro-batch gradients the gradient of the mean loss over B (for losses that are batch means).

  Returns:
    ((loss, aux), grads) as jax.value_and_grad(loss_fn, has_aux=True) does.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro == 1:
    return grad_fn(params, batch)
  micro_batches = jax.tree.map(lambda x: constrain(split_micro_batches(x, num_micro)), batch)

  def body(grad_sum, micro_batch):
    (loss, aux), grads = grad_fn(params, micro_batch)
    return jax.tree.map(jnp.add, grad_sum, grads), (loss, aux)

  zeros = jax.tree.map(jnp.zeros_like, params)
  grad_sum, stacked = jax.lax.scan(body, zeros, micro_batches)
  grads = jax.tree.map(lambda g: g / num_micro, grad_sum)
  return _reduce_micro_batches(stacked), grads


NONFINITE_ACTIONS = ('stop', 'skip')


def check_on_nonfinite(action: str) -> str:
  if action not in NONFINITE_ACTIONS:
    raise ConfigError(f"unknown train.on_nonfinite '{action}': set it to 'stop' (end training at "
                      "the step) or 'skip' (keep the last good state, skip the batch, go on)")
  return action


def create_train_step(config, generator: models.Generator, discriminator: models.Discriminator,
                      mesh: Optional[Mesh] = None, phases: Sequence[str] = ('d', 'g')
                      ) -> Callable[..., Tuple[GANTrainState, Metrics]]:
  """Returns the pure `train_step(state, batch) -> (state, metrics)`.

  `batch` holds 'image' [d_steps, B, H, W, C] in [-1, 1] and 'label' [d_steps, B]. Each D step
  passes real and fake images through D in one forward, so D's spectral vectors advance once per D
  step. G's spectral vectors and BN statistics advance in the G step only: the D steps run G in
  training mode (batch statistics) and drop its state updates. Randomness is
  fold_in(state.rng, state.step), so a step's numbers do not depend on how it is sharded.

  With `train.grad_accum_steps` = k > 1, every D step and the G step average the gradients of k
  micro-batches of B / k (`accumulate_gradients`) into one optimizer update. The latents are drawn
  for all B first; D has no batch statistics, so its update equals the k = 1 update for the same
  real and fake images, but the fakes themselves come from G's batch norms in training mode, which
  see B / k examples at a time. In the G step likewise: G's gradient is the mean of the
  micro-batch gradients, its BN moving means advance by the mean of the micro-batch means, its
  moving variances by the mean of the micro-batch variances.

  Args:
    config: the run's config.
    generator, discriminator: the modules.
    mesh: the device mesh; its size is checked against the batch and micro-batches.
    phases: what the step runs: 'd' (the D steps), 'g' (the G step) or both (training; the
      benchmark times each alone). The step counter advances either way.

  With `train.on_nonfinite='skip'`, a step whose losses or new parameters are not finite returns
  the state it was given (with the step counter advanced): its batch is skipped.
  """
  adversarial = losses.get_adversarial_loss(config.train.loss)
  skip_nonfinite = check_on_nonfinite(config.train.on_nonfinite) == 'skip'
  train_config, num_classes = config.train, config.data.num_classes
  z_dim = config.model.z_dim
  num_micro = train_config.get('grad_accum_steps', 1)
  if mesh is not None:
    sharding.check_batch_size(train_config.batch_size, mesh, num_micro)
  g_mutable = ['batch_stats', SPECTRAL]
  lr_scale = lr_scale_fn(train_config)

  def scaled(updates, step):
    if lr_scale is None:
      return updates
    return jax.tree.map(lambda u: u * lr_scale(step), updates)

  def constrain(x, spec_fn=sharding.data_sharding):
    if mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, spec_fn(mesh))

  def constrain_micro(x):  # [k, B / k, ...]: the examples (B / k) are sharded, not the k axis.
    return constrain(x, sharding.step_batch_sharding)

  def latents(rng, batch_size):
    z, labels = sample_latents(rng, batch_size, z_dim, num_classes)
    return constrain(z), constrain(labels)

  def d_step(state: GANTrainState, real, real_labels, rng):
    z, fake_labels = latents(rng, real.shape[0])

    def loss_fn(d_params, examples):
      fake, _ = generator.apply({'params': state.g_params, **state.g_state}, examples['z'],
                                examples['fake_label'], train=True, mutable=g_mutable)
      fake = jax.lax.stop_gradient(fake)
      images = jnp.concatenate([examples['real'], fake.astype(examples['real'].dtype)], axis=0)
      labels = jnp.concatenate([examples['real_label'], examples['fake_label']], axis=0)
      logits, d_state = discriminator.apply({'params': d_params, **state.d_state}, images, labels,
                                            update_sn=True, mutable=[SPECTRAL])
      real_logits, fake_logits = jnp.split(logits, 2)
      loss = adversarial.d_loss(real_logits, fake_logits)
      return loss, {'state': d_state, 'real': jnp.mean(real_logits),
                    'fake': jnp.mean(fake_logits)}

    examples = {'real': real, 'real_label': real_labels, 'z': z, 'fake_label': fake_labels}
    (loss, aux), grads = accumulate_gradients(loss_fn, state.d_params, examples, num_micro,
                                              constrain_micro)
    updates, d_opt_state = state.d_tx.update(grads, state.d_opt_state, state.d_params)
    updates = scaled(updates, state.step)
    state = state.replace(d_params=optax.apply_updates(state.d_params, updates),
                          d_state=dict(aux['state']), d_opt_state=d_opt_state)
    metrics = {'train/d_loss': loss, 'train/d_real': aux['real'], 'train/d_fake': aux['fake'],
               'train/d_grad_norm': optax.global_norm(grads)}
    return state, metrics

  def g_step(state: GANTrainState, batch_size, rng):
    z, labels = latents(rng, batch_size)

    def loss_fn(g_params, examples):
      fake, g_state = generator.apply({'params': g_params, **state.g_state}, examples['z'],
                                      examples['label'], train=True, mutable=g_mutable)
      logits = discriminator.apply({'params': state.d_params, **state.d_state}, fake,
                                   examples['label'], update_sn=False)
      return adversarial.g_loss(logits), g_state

    (loss, g_state), grads = accumulate_gradients(
        loss_fn, state.g_params, {'z': z, 'label': labels}, num_micro, constrain_micro)
    updates, g_opt_state = state.g_tx.update(grads, state.g_opt_state, state.g_params)
    updates = scaled(updates, state.step)
    g_params = optax.apply_updates(state.g_params, updates)
    # Before ema_start_step the EMA tracks G exactly (decay 0).
    decay = jnp.where(state.step >= train_config.ema_start_step, train_config.ema_decay, 0.0)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_g_params, g_params)
    state = state.replace(g_params=g_params, g_state=dict(g_state), g_opt_state=g_opt_state,
                          ema_g_params=ema)
    return state, {'train/g_loss': loss, 'train/g_grad_norm': optax.global_norm(grads)}

  def train_step(state: GANTrainState, batch: Batch) -> Tuple[GANTrainState, Metrics]:
    start_state = state
    step_rng = jax.random.fold_in(state.rng, state.step)
    d_steps = batch['image'].shape[0]
    metrics = {}
    if 'd' in phases:
      for i in range(d_steps):
        state, metrics = d_step(state, batch['image'][i], batch['label'][i],
                                jax.random.fold_in(step_rng, i))
    if 'g' in phases:
      state, g_metrics = g_step(state, batch['image'].shape[1],
                                jax.random.fold_in(step_rng, d_steps))
      metrics = {**metrics, **g_metrics}
    # One flag for the host's non-finite guard: every loss and every parameter of G and D.
    finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(
        (metrics, state.g_params, state.d_params))]
    all_finite = jnp.all(jnp.stack(finite))
    metrics['train/all_finite'] = all_finite
    if lr_scale is not None:
      metrics['train/lr_scale'] = lr_scale(start_state.step)
    if skip_nonfinite:  # Keep the state from before the step: the batch is skipped.
      state = jax.tree.map(lambda new, old: jnp.where(all_finite, new, old), state, start_state)
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
