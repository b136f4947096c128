"""Orbax checkpoints and automatic resume.

Each checkpoint step holds three items: `state` (the whole GANTrainState), `generator` (G's EMA
and raw parameters and its mutable collections, so evaluation restores G alone) and `config`
(JSON).
"""

import json
import os
from typing import Any, Optional

from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp

from sagan_jax import models
from sagan_jax.errors import ConfigError
from sagan_jax.train_state import GANTrainState

# Config fields that change the shapes of the saved state: a checkpoint written with other values
# cannot be resumed.
SHAPE_FIELDS = ('data.resolution', 'data.channels', 'data.num_classes', 'model.ch', 'model.z_dim',
                'model.g_attention', 'model.d_attention')
ITEMS = ('state', 'generator', 'config')


def checkpoint_dir(workdir: epath.PathLike) -> epath.Path:
  """WORKDIR/checkpoints as an absolute path (Orbax rejects relative ones); gs:// as it is."""
  workdir = str(workdir)
  return epath.Path(workdir if '://' in workdir else os.path.abspath(workdir)) / 'checkpoints'


def create_checkpoint_manager(workdir: epath.PathLike, config) -> ocp.CheckpointManager:
  """A manager over WORKDIR/checkpoints keeping the newest `config.keep_checkpoints`."""
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, state: GANTrainState, config) -> None:
  """Saves the items at state.step (asynchronously; `manager.wait_until_finished()`)."""
  generator = {'ema_params': state.ema_g_params, 'params': state.g_params, 'state': state.g_state}
  manager.save(int(state.step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), generator=ocp.args.StandardSave(generator),
      config=ocp.args.JsonSave(config.to_dict())))


def restore_latest(manager: ocp.CheckpointManager, abstract_state: GANTrainState
                   ) -> Optional[GANTrainState]:
  """Restores the newest checkpoint into `abstract_state`'s structure and shardings, or None."""
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  return restored['state']


def abstract_like(state_fn, sharding) -> GANTrainState:
  """ShapeDtypeStructs (with `sharding`) of the state that `state_fn()` would build."""
  shapes = jax.eval_shape(state_fn)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def _field(config_dict: Any, dotted: str) -> Any:
  for key in dotted.split('.'):
    config_dict = config_dict.get(key) if isinstance(config_dict, dict) else None
  return json.loads(json.dumps(config_dict))  # Tuples and lists compare alike.


def check_compatible(manager: ocp.CheckpointManager, config) -> None:
  """Raises ConfigError when the newest checkpoint was written with other SHAPE_FIELDS."""
  step = manager.latest_step()
  if step is None:
    return
  saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  current = config.to_dict()
  differences = [f'{name} is {_field(saved, name)} there and {_field(current, name)} here'
                 for name in SHAPE_FIELDS if _field(saved, name) != _field(current, name)]
  if differences:
    raise ConfigError(
        f'{manager.directory} holds checkpoints of another model ({"; ".join(differences)}): '
        'pass the same settings to resume, or use a new --workdir')


def load_generator(workdir: epath.PathLike, step: Optional[int] = None, use_ema: bool = True):
  """Restores G alone (no optimizers, no D) and the config it was trained with.

  Args:
    workdir: a training workdir (local or gs://).
    step: the checkpoint step; None for the newest.
    use_ema: the EMA weights (default) or the raw ones.
  Returns:
    (config, generator module, params, mutable collections, step).
  """
  directory = checkpoint_dir(workdir)
  steps = []
  if directory.exists():
    manager = ocp.CheckpointManager(directory, item_names=ITEMS)
    steps = manager.all_steps()
  if not steps:
    raise ConfigError(f'no checkpoint in {directory}: pass the --workdir that training wrote')
  step = max(steps) if step is None else step
  if step not in steps:
    raise ConfigError(f'no checkpoint of step {step} in {directory}: use one of {sorted(steps)}')
  restored = manager.restore(step, args=ocp.args.Composite(
      generator=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
  config = ml_collections.ConfigDict(restored['config'])
  generator = restored['generator']
  params = generator['ema_params'] if use_ema else generator['params']
  return config, models.create_generator(config), params, generator['state'], step
