"""Whether a checkpoint holds the model that a config builds: checked before anything is restored.

A checkpoint of another model is bad input, not damage: it is refused with one line naming what
differs, and never moved aside as unreadable (checkpointing.restore_latest). Other data settings
(STREAM_FIELDS) give the same model another data order: restored, with a warning.
"""

import json
from typing import Any, Dict, List

import jax
import ml_collections

from sagan_jax import architectures
from sagan_jax.errors import ConfigError

SHAPE_FIELDS = ('data.resolution', 'data.channels', 'data.num_classes', 'model.ch', 'model.z_dim',
                'model.g_widths', 'model.d_widths', 'model.g_shared_embedding',
                'model.g_attention', 'model.d_attention', 'model.progressive_resolutions')
# The settings that decide the training stream's order: a checkpoint's input position counts
# examples of that stream, so with another value it goes on in a different one.
STREAM_FIELDS = ('seed', 'data.name', 'data.split', 'data.max_examples', 'data.shuffle_buffer')
# The values that configs saved before a field existed stand for.
FIELD_DEFAULTS = {'model.progressive_resolutions': [], 'model.g_shared_embedding': 0,
                  'data.max_examples': 0}


def _field(config_dict: Any, dotted: str) -> Any:
  value = config_dict
  for key in dotted.split('.'):
    value = value.get(key) if isinstance(value, dict) else None
  if value is None:
    value = FIELD_DEFAULTS.get(dotted)
  if dotted in ('model.g_widths', 'model.d_widths'):  # () is the resolution's table.
    value = getattr(architectures.architecture(
        ml_collections.ConfigDict(config_dict['model']), config_dict['data']['resolution']),
        dotted[len('model.'):])
  return json.loads(json.dumps(value))  # Tuples and lists compare alike.


def _differences(saved_config: Dict[str, Any], config, fields) -> List[str]:
  """'data.max_examples is 5000 there and 0 here' for each of `fields` that differs."""
  current = config.to_dict()
  return [f'{name} is {_field(saved_config, name)} there and {_field(current, name)} here'
          for name in fields if _field(saved_config, name) != _field(current, name)]


def check_compatible(saved_config: Dict[str, Any], config, directory) -> None:
  """Raises ConfigError when a checkpoint's config differs from `config` in SHAPE_FIELDS."""
  differences = _differences(saved_config, config, SHAPE_FIELDS)
  if differences:
    raise ConfigError(
        f'{directory} holds checkpoints of another model ({"; ".join(differences)}): '
        'pass the same settings to resume, or use a new --workdir')


def stream_changes(saved_config: Dict[str, Any], config) -> List[str]:
  """The STREAM_FIELDS that differ between a checkpoint's config and `config`, described."""
  return _differences(saved_config, config, STREAM_FIELDS)


def _leaves(tree) -> Dict[str, tuple]:
  """'g_params/block0/conv1/kernel' -> shape, for a state or its saved metadata alike."""
  def name(key):
    return str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key))))
  return {'/'.join(name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_state(manager, step: int, abstract_state) -> None:
  """Raises ConfigError when checkpoint `step`'s arrays differ in names or shapes from
  `abstract_state`'s; returns when they match or the checkpoint's metadata cannot be read."""
  try:
    saved = _leaves(manager.item_metadata(step)['state'])
  except Exception:  # pylint: disable=broad-except  (unreadable: the caller sets it aside)
    return
  wanted = _leaves(abstract_state)
  differences = [f'{k} is {saved.get(k, "absent")} there and {wanted.get(k, "absent")} here'
                 for k in [*wanted, *(k for k in saved if k not in wanted)]  # Params first.
                 if saved.get(k) != wanted.get(k)]
  if differences:
    more = f' and {len(differences) - 3} more' if len(differences) > 3 else ''
    raise ConfigError(
        f'{manager.directory} holds checkpoints of another model (step {step}: '
        f'{"; ".join(differences[:3])}{more}): pass the settings it was trained with '
        '(its config is saved with it), or use a new --workdir')
