"""check_config: every field of a training config checked once, before anything is written.

The tools call it right after parsing their flags, so a wrong value ends with one line that names
the field and the fix, before a workdir, checkpoint or event file exists. Checks that need the
data (files present, tfds set prepared, enough images) stay with the input pipeline and run,
also before the workdir is touched, when training starts. Nothing here imports TensorFlow; jax
and flax load when a config is checked, not when the module is imported.
"""

import dataclasses
import math
from typing import Optional

from sagan_jax.errors import ConfigError

TFDS_SOURCES = ('imagenet2012', 'cifar10')
DATA_SOURCES = ('fashion_mnist', 'folder') + TFDS_SOURCES


@dataclasses.dataclass(frozen=True)
class Range:
  """Allowed values of a number: low <= x (low < x if low_open), x < high, finite."""
  low: float
  high: Optional[float] = None
  low_open: bool = False
  example: str = ''

  def contains(self, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      return False
    above = value > self.low if self.low_open else value >= self.low
    return above and (self.high is None or value < self.high)

  def describe(self) -> str:
    low = f'{"above" if self.low_open else "at least"} {self.low:g}'
    return f'{low} and below {self.high:g}' if self.high is not None else low


POSITIVE = Range(0, low_open=True)
COUNT = Range(1)  # Sizes and counts: 1 or more.
OFF_OR_COUNT = Range(0)  # 0 switches the feature off.
FRACTION = Range(0, 1)  # Decays and Adam betas: [0, 1).

# Field -> its allowed range and a value to suggest.
RANGES = {
    'seed': (OFF_OR_COUNT, '0'),
    'cpu_devices': (OFF_OR_COUNT, '0 (jax default) or 2'),
    'data.num_classes': (COUNT, 'the number of class labels'),
    'data.shuffle_buffer': (COUNT, '10000'),
    'data.prefetch': (OFF_OR_COUNT, '2 (0: no prefetch thread)'),
    'data.max_examples': (OFF_OR_COUNT, '0 (all of the split) or 5000'),
    'model.ch': (Range(8), '64 (a multiple of 8)'),
    'model.z_dim': (COUNT, '128'),
    'model.attention_block_size': (COUNT, '512'),
    'model.bn_momentum': (FRACTION, '0.9'),
    'model.projection_scale': (POSITIVE, '1.0'),
    'model.g_shared_embedding': (OFF_OR_COUNT, '0 (per-class tables) or 128'),
    'train.batch_size': (COUNT, '256 (global, a multiple of the device count)'),
    'train.num_steps': (COUNT, '1000000'),
    'train.d_steps': (COUNT, '1'),
    'train.grad_accum_steps': (COUNT, '1'),
    'train.g_lr': (POSITIVE, '1e-4'),
    'train.d_lr': (POSITIVE, '4e-4'),
    'train.lr_decay_start_step': (OFF_OR_COUNT, '0 (constant rates)'),
    'train.lr_decay_end_factor': (FRACTION, '0.0 (down to zero)'),
    'train.beta1': (FRACTION, '0.0'),
    'train.beta2': (FRACTION, '0.999'),
    'train.adam_eps': (POSITIVE, '1e-8'),
    'train.ema_decay': (Range(0, 1.0000001), '0.9999 (1 freezes the EMA)'),
    'train.ema_start_step': (OFF_OR_COUNT, '1000'),
    'train.consistency_weight': (Range(0), '0 (off) or 10'),
    'train.consistency_fake_weight': (Range(0), '0 (off) or 10'),
    'train.progressive_fade_steps': (OFF_OR_COUNT, '0 (no fade-in) or 500'),
    'log_every_steps': (COUNT, '100'),
    'sample_every_steps': (COUNT, '5000'),
    'checkpoint_every_steps': (OFF_OR_COUNT, '5000 (0: by minutes only)'),
    'checkpoint_every_minutes': (OFF_OR_COUNT, '30 (0: by steps only)'),
    'keep_checkpoints': (COUNT, '3'),
    'profile_num_steps': (OFF_OR_COUNT, '0 (off) or 5'),
    'profile_first_step': (OFF_OR_COUNT, '10'),
    'sample.num_rows': (COUNT, '10'),
    'sample.num_columns': (COUNT, '10'),
    'sample.final_per_class': (OFF_OR_COUNT, '0 (none)'),
    'eval.every_steps': (OFF_OR_COUNT, '0 (off) or 10000'),
    'eval.num_samples': (COUNT, '10000'),
    'eval.batch_size': (COUNT, '256'),
    'eval.truncation': (OFF_OR_COUNT, '0 (off)'),
    'eval.standing_stats': (OFF_OR_COUNT, '0 (off)'),
}


def _get(config, field: str):
  """The value at a dotted path; None when a saved config predates the field."""
  value = config
  for part in field.split('.'):
    if value is None or part not in value:
      return None
    value = value[part]
  return value


def _check_ranges(config) -> None:
  for field, (allowed, example) in RANGES.items():
    value = _get(config, field)
    if value is not None and not allowed.contains(value):
      raise ConfigError(f'{field}={value!r} is out of range (it must be {allowed.describe()}): '
                        f'set --config.{field}, e.g. to {example}')


def _check_choices(config) -> None:
  # pylint: disable=g-import-not-at-top  (the tools' --help and input_pipeline need only the names)
  from sagan_jax import architectures
  from sagan_jax import augment
  from sagan_jax import checkpointing
  from sagan_jax import evaluation
  from sagan_jax import losses
  from sagan_jax import progressive
  from sagan_jax import regularizers
  from sagan_jax import schedules
  from sagan_jax import train
  data = config.data
  if data.name not in DATA_SOURCES:
    raise ConfigError(f"unknown data.name '{data.name}': set --config.data.name to one of "
                      f'{", ".join(DATA_SOURCES)}')
  if data.channels not in (1, 3):
    raise ConfigError(f'data.channels={data.channels}: set --config.data.channels to 1 '
                      '(grayscale) or 3 (RGB)')
  if data.name == 'folder' and not data.folder_dir:
    raise ConfigError("data.name is 'folder' but data.folder_dir is unset: set "
                      '--config.data.folder_dir=ROOT (one subfolder of images per class)')
  architectures.check_model_config(config.model, data.resolution)
  progressive.check_config(config)
  losses.get_adversarial_loss(config.train.loss)
  train.check_on_nonfinite(config.train.on_nonfinite)
  schedules.ema_decay_fn(config.train)
  augment.parse_policy(config.train.get('augment', ''))
  regularizers.d_regularizers_from_config(config.train)
  batch, accum = config.train.batch_size, config.train.grad_accum_steps
  if batch % accum:
    raise ConfigError(f'train.batch_size={batch} does not split into train.grad_accum_steps='
                      f'{accum} micro-batches: set --config.train.batch_size to a multiple of '
                      f'{accum}')
  eval_config = config.eval
  evaluation.check_settings(evaluation.settings_from_config(config))
  if eval_config.best_metric:
    checkpointing.check_best_metric(eval_config.best_metric)


def check_config(config, mesh=None) -> None:
  """Raises ConfigError, naming the field and a fix, for the first wrong setting in `config`.

  Args:
    config: a training config (configs/default.py lists every field).
    mesh: the device mesh, when known: the global batch must divide over its devices.
  """
  _check_ranges(config)
  _check_choices(config)
  if mesh is not None:
    from sagan_jax import sharding  # pylint: disable=g-import-not-at-top
    sharding.check_batch_size(config.train.batch_size, mesh, config.train.grad_accum_steps)
