"""Orbax checkpoints of the train state (with the config as JSON) and automatic resume."""

import json
from typing import Any, Optional

from etils import epath
import jax
import orbax.checkpoint as ocp

from sagan_jax.errors import ConfigError
from sagan_jax.train_state import GANTrainState

# Config fields that change the shapes of the saved state: a checkpoint written with other values
# cannot be resumed.
SHAPE_FIELDS = ('data.resolution', 'data.channels', 'data.num_classes', 'model.ch', 'model.z_dim',
                'model.g_attention', 'model.d_attention')


def create_checkpoint_manager(workdir: epath.PathLike, config) -> ocp.CheckpointManager:
  """A manager over WORKDIR/checkpoints keeping the newest `config.keep_checkpoints`."""
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
  return ocp.CheckpointManager(epath.Path(workdir) / 'checkpoints', options=options,
                               item_names=('state', 'config'))


def save(manager: ocp.CheckpointManager, state: GANTrainState, config) -> None:
  """Saves state and config at state.step (asynchronously; `manager.wait_until_finished()`)."""
  manager.save(int(state.step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict())))


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
