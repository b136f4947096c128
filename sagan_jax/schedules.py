"""What changes with the G step over a run: the learning rates' decay and the EMA's decay.

Both are functions of the step count alone (`state.step` before the G step), traced into the
compiled step, so a resumed run goes on exactly where it stopped.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from sagan_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LrScale:
  """The learning-rate factor at a G step (`state.step` before it): 1 before `start`, then a
  linear fall to `end` at `num_steps`. A frozen dataclass, as EmaDecay below: equal settings give
  equal (static) step contexts."""
  start: int
  num_steps: int
  end: float

  def __call__(self, step: jax.Array) -> jax.Array:
    left = jnp.clip((self.num_steps - step) / (self.num_steps - self.start), 0.0, 1.0)
    return (self.end + (1.0 - self.end) * left).astype(jnp.float32)


def lr_scale_fn(train_config) -> Optional[LrScale]:
  """The learning-rate factor of a G step (train.lr_decay_start_step), or None when constant.

  From G step `lr_decay_start_step` on, both rates fall linearly to `lr_decay_end_factor` times
  their value at `num_steps` (0 by default: the last step still moves by 1 / (num_steps - start)
  of the full rate); before it, and with 0 (the paper), they are constant. The D steps of a G
  step share its factor. Scaling Adam's update is scaling its learning rate, so the optimizer
  states are the same with and without decay: a run can turn it on when resumed.
  """
  start, num_steps = train_config.get('lr_decay_start_step', 0), train_config.num_steps
  end = float(train_config.get('lr_decay_end_factor', 0.0))
  if start < 0:
    raise ConfigError(f'train.lr_decay_start_step={start}: use 0 (constant learning rates) or the '
                      f'G step at which the decay (it ends at train.num_steps={num_steps}) begins')
  if not start or start >= num_steps:
    return None
  return LrScale(int(start), int(num_steps), end)


EMA_AVERAGES = ('exponential', 'uniform')


@dataclasses.dataclass(frozen=True)
class EmaDecay:
  """The decay of G's EMA at a G step (`state.step` before it): e <- decay e + (1 - decay) p.

  Before `start` it is 0 (the EMA copies G). From it, 'exponential' decays by `decay` per G step;
  'uniform' keeps the mean of G's weights after each G step from `start` on (Polyak averaging;
  SWA's average): n / (n + 1) once n steps are in it. A frozen dataclass: equal settings give
  equal (static) step contexts, so the compiled step is shared.
  """
  kind: str
  decay: float
  start: int

  def __call__(self, step: jax.Array) -> jax.Array:
    if self.kind == 'uniform':
      n = jnp.maximum(step - self.start, 0).astype(jnp.float32)
      return n / (n + 1)
    return jnp.where(step >= self.start, jnp.float32(self.decay), jnp.float32(0))


def ema_decay_fn(train_config) -> EmaDecay:
  """The EmaDecay of `train.ema_average`, `ema_decay` and `ema_start_step`."""
  kind = train_config.get('ema_average', 'exponential')
  if kind not in EMA_AVERAGES:
    raise ConfigError(f"unknown train.ema_average '{kind}': set it to 'exponential' (decay "
                      "train.ema_decay per G step) or 'uniform' (the mean of G's weights from "
                      'train.ema_start_step on)')
  return EmaDecay(kind, float(train_config.ema_decay), int(train_config.ema_start_step))
