"""Orbax checkpoints of the train state (with the config as JSON) and automatic resume."""

from typing import Optional

from etils import epath
import jax
import orbax.checkpoint as ocp

from sagan_jax.train_state import GANTrainState


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
