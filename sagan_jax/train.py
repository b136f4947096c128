"""The SAGAN train step as pure functions: `d_step`, `g_step` and `train_step` composing them.

    train_step(ctx, state, batch) = d_steps x d_step, then g_step, then the non-finite guard

`StepContext` holds what is fixed for a run (the modules, the loss, sizes, the mesh, the hooks);
`create_train_step` builds it from a config and returns `train_step` bound to it, which
`compile_train_step` jits over the device mesh. Randomness is fold_in(state.rng, state.step), so a
step's numbers do not depend on how it is sharded.

Where new training ideas enter (`StepHooks`):
- `augment(rng, images) -> images` transforms every image D sees: real and fake in the D steps,
  fake in the G step, inside the differentiated function, so G's gradient flows through it
  (DiffAugment, ADA); `hooks_from_config` puts `train.augment`'s policy (sagan_jax.augment) here.
- `d_regularizers` / `g_regularizers`: extra loss terms `reg(inputs: LossInputs, rng) ->
  (scalar, metrics)` added to D's or G's loss (R1, consistency regularization, orthogonal
  regularization); their metrics join the step's. `train.consistency_weight` puts
  sagan_jax.regularizers' (b)CR among D's.
"""

import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from sagan_jax import augment as augment_lib
from sagan_jax import latents
from sagan_jax import losses
from sagan_jax import models
from sagan_jax import progressive
from sagan_jax import regularizers
from sagan_jax import schedules
from sagan_jax import sharding
from sagan_jax.layers import SPECTRAL
from sagan_jax.errors import ConfigError
from sagan_jax.train_state import GANTrainState

Batch = Dict[str, jax.Array]
Metrics = Dict[str, jax.Array]
G_MUTABLE = ('batch_stats', SPECTRAL)  # G's collections that its training-mode forward updates.


class LossInputs(NamedTuple):
  """What a regularizer sees of the loss it is added to.

  Attributes:
    params: the parameters being differentiated (D's in a D step, G's in the G step).
    images: the images D scored, after `augment`: [real; fake] in a D step, fake in the G step.
    labels: their class labels.
    logits: D's outputs for them.
    discriminator: `(images, labels) -> logits` with the D parameters of this loss (the ones
      being differentiated in a D step) and read-only spectral vectors, e.g. for R1.
  """
  params: Any
  images: jax.Array
  labels: jax.Array
  logits: jax.Array
  discriminator: Callable[[jax.Array, jax.Array], jax.Array]


Augment = Callable[[jax.Array, jax.Array], jax.Array]  # (rng, images [B, H, W, C]) -> images
Regularizer = Callable[[LossInputs, jax.Array], Tuple[jax.Array, Metrics]]


@dataclasses.dataclass(frozen=True)
class StepHooks:
  """The places where D's inputs are transformed and extra loss terms enter (module docstring)."""
  augment: Optional[Augment] = None
  d_regularizers: Tuple[Regularizer, ...] = ()
  g_regularizers: Tuple[Regularizer, ...] = ()


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What stays fixed over a run's train steps (static under jit)."""
  generator: models.Generator
  discriminator: models.Discriminator
  loss: losses.AdversarialLoss
  z_dim: int
  num_classes: int
  num_micro: int = 1  # train.grad_accum_steps
  # The EMA's decay at a G step (schedules.ema_decay_fn); None: an exact copy of G.
  ema_decay: Optional[Callable[[jax.Array], jax.Array]] = None
  lr_scale: Optional[Callable[[jax.Array], jax.Array]] = None
  skip_nonfinite: bool = False
  mesh: Optional[Mesh] = None
  phases: Tuple[str, ...] = ('d', 'g')
  hooks: StepHooks = StepHooks()
  # Progressive growing: a step's fade-in weight (sagan_jax.progressive); None: fixed networks.
  alpha_fn: Optional[Callable[[jax.Array], jax.Array]] = None

  def constrain(self, x: jax.Array, spec_fn=sharding.data_sharding) -> jax.Array:
    """`x` with its leading (example) axis sharded over the mesh's 'data' axis."""
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, spec_fn(self.mesh))

  def constrain_micro(self, x: jax.Array) -> jax.Array:
    """[k, B / k, ...]: the examples (B / k) are sharded, not the micro-batch axis k."""
    return self.constrain(x, sharding.step_batch_sharding)

  def draw_latents(self, rng: jax.Array, batch_size: int) -> Tuple[jax.Array, jax.Array]:
    z, labels = latents.sample_latents(rng, batch_size, self.z_dim, self.num_classes)
    return self.constrain(z), self.constrain(labels)


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
  """value_and_grad of `loss_fn(params, batch, index) -> (loss, aux)` over micro-batches.

  `index` is the micro-batch's number (an int32 scalar, 0 without accumulation): loss functions
  that draw random numbers fold it into their key, so micro-batches differ.

  With num_micro > 1 the leaves of `batch` ([B, ...]) are split by `split_micro_batches` and a
  lax.scan (compile time independent of num_micro) sums the gradients; the loss and the aux
  outputs are combined by `_reduce_micro_batches`. Equal micro-batch sizes make the mean of the
  micro-batch gradients the gradient of the mean loss over B (for losses that are batch means).

  Returns:
    ((loss, aux), grads) as jax.value_and_grad(loss_fn, has_aux=True) does.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro == 1:
    return grad_fn(params, batch, jnp.zeros((), jnp.int32))
  micro_batches = jax.tree.map(lambda x: constrain(split_micro_batches(x, num_micro)), batch)

  def body(grad_sum, micro_batch_and_index):
    (loss, aux), grads = grad_fn(params, *micro_batch_and_index)
    return jax.tree.map(jnp.add, grad_sum, grads), (loss, aux)

  zeros = jax.tree.map(jnp.zeros_like, params)
  indices = jnp.arange(num_micro, dtype=jnp.int32)
  grad_sum, stacked = jax.lax.scan(body, zeros, (micro_batches, indices))
  grads = jax.tree.map(lambda g: g / num_micro, grad_sum)
  return _reduce_micro_batches(stacked), grads


NONFINITE_ACTIONS = ('stop', 'skip')


def check_on_nonfinite(action: str) -> str:
  if action not in NONFINITE_ACTIONS:
    raise ConfigError(f"unknown train.on_nonfinite '{action}': set it to 'stop' (end training at "
                      "the step) or 'skip' (keep the last good state, skip the batch, go on)")
  return action


def _regularize(regularizers: Sequence[Regularizer], inputs: LossInputs, rng: jax.Array,
                loss: jax.Array) -> Tuple[jax.Array, Metrics]:
  """`loss` plus every regularizer's term; their metrics merged."""
  metrics = {}
  for i, regularizer in enumerate(regularizers):
    term, reg_metrics = regularizer(inputs, jax.random.fold_in(rng, i))
    loss, metrics = loss + term, {**metrics, **reg_metrics}
  return loss, metrics


def _augment(ctx: StepContext, rng: jax.Array, images: jax.Array) -> jax.Array:
  augment = ctx.hooks.augment
  return images if augment is None else augment(rng, images)


# Keys derived from a D or G step's key: the latents use the key itself (as before hooks
# existed), augmentation and regularizers fold in these numbers.
_AUGMENT_KEY, _REGULARIZER_KEY = 1, 2


def _d_loss(ctx: StepContext, state: GANTrainState, rng: jax.Array, d_params, examples, index):
  """D's loss on one (micro-)batch: real and fake images through D in one forward."""
  fake, _ = ctx.generator.apply({'params': state.g_params, **state.g_state}, examples['z'],
                                examples['fake_label'], train=True, mutable=list(G_MUTABLE))
  fake = jax.lax.stop_gradient(fake)
  rng = jax.random.fold_in(rng, index)
  images = jnp.concatenate([examples['real'], fake.astype(examples['real'].dtype)], axis=0)
  images = _augment(ctx, jax.random.fold_in(rng, _AUGMENT_KEY), images)
  labels = jnp.concatenate([examples['real_label'], examples['fake_label']], axis=0)
  logits, d_state = ctx.discriminator.apply({'params': d_params, **state.d_state}, images, labels,
                                            update_sn=True, mutable=[SPECTRAL])
  real_logits, fake_logits = jnp.split(logits, 2)
  loss = ctx.loss.d_loss(real_logits, fake_logits)
  if ctx.hooks.d_regularizers:
    d_fn = lambda x, y: ctx.discriminator.apply({'params': d_params, **state.d_state}, x, y,
                                                update_sn=False)
    inputs = LossInputs(d_params, images, labels, logits, d_fn)
    loss, reg_metrics = _regularize(ctx.hooks.d_regularizers, inputs,
                                    jax.random.fold_in(rng, _REGULARIZER_KEY), loss)
  else:
    reg_metrics = {}
  return loss, {'state': d_state, 'real': jnp.mean(real_logits), 'fake': jnp.mean(fake_logits),
                'regularizers': reg_metrics}


def d_step(ctx: StepContext, state: GANTrainState, real: jax.Array, real_labels: jax.Array,
           rng: jax.Array) -> Tuple[GANTrainState, Metrics]:
  """One D update on real images [B, H, W, C] and as many fresh fakes; G is not updated.

  G runs in training mode (batch statistics) and its state updates are dropped; D's spectral
  vectors advance once.
  """
  z, fake_labels = ctx.draw_latents(rng, real.shape[0])
  if ctx.generator.fades_in:  # Progressive growing: real images fade in as G's do (ProGAN).
    real = progressive.fade_real(real, state.g_state)
  examples = {'real': real, 'real_label': real_labels, 'z': z, 'fake_label': fake_labels}
  loss_fn = lambda params, batch, index: _d_loss(ctx, state, rng, params, batch, index)
  (loss, aux), grads = accumulate_gradients(loss_fn, state.d_params, examples, ctx.num_micro,
                                            ctx.constrain_micro)
  updates, d_opt_state = state.d_tx.update(grads, state.d_opt_state, state.d_params)
  updates = _scaled(ctx, updates, state.step)
  state = state.replace(d_params=optax.apply_updates(state.d_params, updates),
                        d_state={**state.d_state, **aux['state']}, d_opt_state=d_opt_state)
  metrics = {'train/d_loss': loss, 'train/d_real': aux['real'], 'train/d_fake': aux['fake'],
             'train/d_grad_norm': optax.global_norm(grads), **aux['regularizers']}
  return state, metrics


def _g_loss(ctx: StepContext, state: GANTrainState, rng: jax.Array, g_params, examples, index):
  """G's loss on one (micro-)batch; D's spectral vectors are read, not advanced."""
  fake, g_state = ctx.generator.apply({'params': g_params, **state.g_state}, examples['z'],
                                      examples['label'], train=True, mutable=list(G_MUTABLE))
  rng = jax.random.fold_in(rng, index)
  images = _augment(ctx, jax.random.fold_in(rng, _AUGMENT_KEY), fake)
  d_fn = lambda x, y: ctx.discriminator.apply({'params': state.d_params, **state.d_state}, x, y,
                                              update_sn=False)
  logits = d_fn(images, examples['label'])
  loss = ctx.loss.g_loss(logits)
  inputs = LossInputs(g_params, images, examples['label'], logits, d_fn)
  loss, reg_metrics = _regularize(ctx.hooks.g_regularizers, inputs,
                                  jax.random.fold_in(rng, _REGULARIZER_KEY), loss)
  return loss, {'state': g_state, 'regularizers': reg_metrics}


def g_step(ctx: StepContext, state: GANTrainState, batch_size: int, rng: jax.Array
           ) -> Tuple[GANTrainState, Metrics]:
  """One G update on `batch_size` fresh latents; G's BN statistics and spectral vectors advance.

  The EMA of G follows (schedules.ema_decay_fn: an exact copy before train.ema_start_step).
  """
  z, labels = ctx.draw_latents(rng, batch_size)
  loss_fn = lambda params, batch, index: _g_loss(ctx, state, rng, params, batch, index)
  (loss, aux), grads = accumulate_gradients(loss_fn, state.g_params, {'z': z, 'label': labels},
                                            ctx.num_micro, ctx.constrain_micro)
  updates, g_opt_state = state.g_tx.update(grads, state.g_opt_state, state.g_params)
  updates = _scaled(ctx, updates, state.step)
  g_params = optax.apply_updates(state.g_params, updates)
  decay = ctx.ema_decay(state.step) if ctx.ema_decay else jnp.float32(0)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_g_params, g_params)
  state = state.replace(g_params=g_params, g_state={**state.g_state, **aux['state']},
                        g_opt_state=g_opt_state, ema_g_params=ema)
  return state, {'train/g_loss': loss, 'train/g_grad_norm': optax.global_norm(grads),
                 **aux['regularizers']}


def _scaled(ctx: StepContext, updates, step: jax.Array):
  """Adam's updates times the learning-rate factor of `step` (train.lr_decay_start_step)."""
  scale = ctx.lr_scale
  return updates if scale is None else jax.tree.map(lambda u: u * scale(step), updates)


def train_step(ctx: StepContext, state: GANTrainState, batch: Batch
               ) -> Tuple[GANTrainState, Metrics]:
  """`d_steps` D steps (one per slice of `batch`), one G step, then the non-finite guard.

  `batch` holds 'image' [d_steps, B, H, W, C] in [-1, 1] and 'label' [d_steps, B]. With
  `ctx.skip_nonfinite`, a step whose losses or new parameters are not finite returns the state
  it was given (the step counter advanced): its batch is skipped. `ctx.phases` lets the benchmark
  time the D steps or the G step alone; the step counter advances either way. With progressive
  growing (`ctx.alpha_fn`) the step first writes its alpha into G's and D's 'progress' state.
  """
  if ctx.alpha_fn is not None:  # Progressive growing: the step's alpha, for G, D and samples.
    state = progressive.with_alpha(state, ctx.alpha_fn(state.step))
  start_state = state
  step_rng = jax.random.fold_in(state.rng, state.step)
  d_steps = batch['image'].shape[0]
  metrics = {}
  if 'd' in ctx.phases:
    for i in range(d_steps):
      state, metrics = d_step(ctx, state, batch['image'][i], batch['label'][i],
                              jax.random.fold_in(step_rng, i))
  if 'g' in ctx.phases:
    state, g_metrics = g_step(ctx, state, batch['image'].shape[1],
                              jax.random.fold_in(step_rng, d_steps))
    metrics = {**metrics, **g_metrics}
  # One flag for the host's non-finite guard: every loss and every parameter of G and D.
  finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(
      (metrics, state.g_params, state.d_params))]
  all_finite = jnp.all(jnp.stack(finite))
  metrics['train/all_finite'] = all_finite
  if ctx.lr_scale is not None:
    metrics['train/lr_scale'] = ctx.lr_scale(start_state.step)
  if ctx.skip_nonfinite:  # Keep the state from before the step: the batch is skipped.
    state = jax.tree.map(lambda new, old: jnp.where(all_finite, new, old), state, start_state)
  return state.replace(step=state.step + 1), metrics


def hooks_from_config(config) -> StepHooks:
  """The config's StepHooks: `train.augment`'s DiffAugment and `train.consistency_weight`'s CR."""
  return StepHooks(augment=augment_lib.create_augment(config.train.get('augment', '')),
                   d_regularizers=regularizers.d_regularizers_from_config(config.train))


def create_step_context(config, generator: models.Generator,
                        discriminator: models.Discriminator, mesh: Optional[Mesh] = None,
                        phases: Sequence[str] = ('d', 'g'),
                        hooks: Optional[StepHooks] = None) -> StepContext:
  """The StepContext of a (checked, config_check.check_config) training config.

  `hooks` replace the config's own (`hooks_from_config`, used when None).
  """
  train_config = config.train
  schedule = progressive.schedule_from_config(config)
  return StepContext(
      generator=generator, discriminator=discriminator,
      loss=losses.get_adversarial_loss(train_config.loss), z_dim=config.model.z_dim,
      num_classes=config.data.num_classes, num_micro=train_config.get('grad_accum_steps', 1),
      ema_decay=schedules.ema_decay_fn(train_config),
      lr_scale=schedules.lr_scale_fn(train_config),
      skip_nonfinite=check_on_nonfinite(train_config.on_nonfinite) == 'skip', mesh=mesh,
      phases=tuple(phases), hooks=hooks_from_config(config) if hooks is None else hooks,
      alpha_fn=schedule.alpha if schedule else None)


def create_train_step(config, generator: models.Generator, discriminator: models.Discriminator,
                      mesh: Optional[Mesh] = None, phases: Sequence[str] = ('d', 'g'),
                      hooks: Optional[StepHooks] = None
                      ) -> Callable[[GANTrainState, Batch], Tuple[GANTrainState, Metrics]]:
  """`train_step` bound to the run's StepContext: `step(state, batch) -> (state, metrics)`.

  With `train.grad_accum_steps` = k > 1, every D step and the G step average the gradients of k
  micro-batches of B / k (`accumulate_gradients`) into one optimizer update. The latents are drawn
  for all B first; D has no batch statistics, so its update equals the k = 1 update for the same
  real and fake images, but the fakes themselves come from G's batch norms in training mode, which
  see B / k examples at a time. In the G step likewise: G's gradient is the mean of the
  micro-batch gradients, its BN moving means advance by the mean of the micro-batch means, its
  moving variances by the mean of the micro-batch variances.
  """
  ctx = create_step_context(config, generator, discriminator, mesh, phases, hooks)

  def step(state: GANTrainState, batch: Batch) -> Tuple[GANTrainState, Metrics]:
    return train_step(ctx, state, batch)

  return step


def compile_train_step(step: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
  """jax.jit over `mesh`: state replicated and donated, the batch sharded over 'data'."""
  replicated = sharding.replicated(mesh)
  return jax.jit(step, in_shardings=(replicated, sharding.step_batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)
