"""Orbax checkpoints: what each step holds, resume from the newest good one, G alone for evaluation.

Each checkpoint step holds five items, saved together (asynchronously) and finalized atomically by
Orbax (a save cut off by a kill leaves only a temporary directory, which is never read):
- `state`: the whole GANTrainState (parameters, mutable collections, optimizers, EMA, rng, step);
- `generator`: G's EMA and raw parameters and its mutable collections, so evaluation restores G
  alone;
- `config`: the config as JSON;
- `data`: every process's input-pipeline position, for an exact continuation of the data order;
- `metadata`: step, wall time, elapsed training time and the last logged scores.
"""

import os
from typing import Any, Dict, NamedTuple, Optional

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from sagan_jax import checkpoint_shapes
from sagan_jax import progressive
from sagan_jax import sharding
from sagan_jax.errors import ConfigError
from sagan_jax.errors import first_line
from sagan_jax.train_state import GANTrainState

# Config fields that change the shapes of the saved state: a checkpoint written with other values
# cannot be resumed.
ITEMS = ('state', 'generator', 'config', 'data', 'metadata')
# Checkpoints that cannot be read are moved here (never deleted) so that training can save that
# step again.
UNREADABLE_DIR = 'unreadable_checkpoints'


def checkpoint_dir(workdir: epath.PathLike) -> epath.Path:
  """WORKDIR/checkpoints as an absolute path (Orbax rejects relative ones); gs:// as it is."""
  workdir = str(workdir)
  return epath.Path(workdir if '://' in workdir else os.path.abspath(workdir)) / 'checkpoints'


def save_decision_policy(config) -> policies.SaveDecisionPolicy:
  """When `manager.should_save(step)` says yes: Orbax's policies for the config's schedule.

  - every `checkpoint_every_steps` steps (FixedIntervalPolicy);
  - when the newest checkpoint is `checkpoint_every_minutes` old and no save is still being
    written (ContinuousCheckpointingPolicy; process 0 decides and tells the others). A fresh run
    has no checkpoint yet, so its first asked step saves at once: a workdir that cannot be
    written fails in the first seconds, not after the first interval;
  - at a preemption sync point, when several processes train (PreemptionCheckpointingPolicy).
  The loop asks at the steps where every process asks (train_loop), and saves the last step and
  the SIGTERM step of a single process itself.
  """
  chosen = [policies.PreemptionCheckpointingPolicy()]
  if config.checkpoint_every_steps:
    chosen.append(policies.FixedIntervalPolicy(int(config.checkpoint_every_steps)))
  if config.checkpoint_every_minutes:
    seconds = max(1, round(60 * config.checkpoint_every_minutes))
    chosen.append(policies.ContinuousCheckpointingPolicy(minimum_interval_secs=seconds))
  return policies.AnySavePolicy(chosen)


def create_checkpoint_manager(workdir: epath.PathLike, config) -> ocp.CheckpointManager:
  """An asynchronous manager over WORKDIR/checkpoints keeping the newest `keep_checkpoints`."""
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=save_decision_policy(config),
      preservation_policy=policies.LatestN(config.keep_checkpoints), create=True,
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, state: GANTrainState, config,
         data: Optional[Dict[str, Any]] = None, metadata: Optional[Dict[str, Any]] = None) -> None:
  """Saves all items at state.step; returns once the arrays are copied (writes go on behind).

  Every process must call it, having decided to save (`manager.should_save`, the last step, a
  stop): the save is forced. `data` and `metadata` are JSON-serializable dicts.
  """
  generator = {'ema_params': state.ema_g_params, 'params': state.g_params, 'state': state.g_state}
  manager.save(int(state.step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), generator=ocp.args.StandardSave(generator),
      config=ocp.args.JsonSave(config.to_dict()), data=ocp.args.JsonSave(data or {}),
      metadata=ocp.args.JsonSave(metadata or {})), force=True)


class Restored(NamedTuple):
  state: GANTrainState
  data: Dict[str, Any]
  metadata: Dict[str, Any]


def data_position(restored: Optional[Restored], step: int) -> Optional[int]:
  """This process's input position from the checkpoint, or None to start the stream afresh."""
  if restored is None:
    return None
  data = restored.data
  positions = data.get('positions')
  if positions is not None and data.get('process_count') == jax.process_count():
    return positions[jax.process_index()]
  logging.warning('The checkpoint of step %d holds no input position for %d process(es): the '
                  'data stream restarts from a new seed (parameters and RNG still resume '
                  'exactly).', step, jax.process_count())
  return None


def gather_positions(position: int) -> Dict[str, Any]:
  """Every process's input position, in process order (the checkpoint's `data` item)."""
  positions = [position]
  if jax.process_count() > 1:
    positions = multihost_utils.process_allgather(np.asarray([position], np.int64))
    positions = [int(p) for p in np.asarray(positions).reshape(-1)]
  return {'process_count': jax.process_count(), 'positions': positions}


def _set_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  """Moves an unreadable step out of the manager's directory (kept for inspection)."""
  target = manager.directory.parent / UNREADABLE_DIR / str(step)
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
      target.rmtree()
    (manager.directory / str(step)).rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'set aside checkpoint {step}')
  manager.reload()
  return target


def restore_latest(manager: ocp.CheckpointManager, abstract_state: GANTrainState,
                   config=None) -> Optional[Restored]:
  """Restores the newest readable checkpoint into `abstract_state`'s structure and shardings.

  A checkpoint whose files cannot be read (damaged, half-copied) is moved to
  WORKDIR/unreadable_checkpoints/ with a warning and the next older one is tried. With `config`,
  a checkpoint written with other checkpoint_shapes.SHAPE_FIELDS raises ConfigError, and so does
  one whose arrays have other names or shapes than `abstract_state`'s (nothing is moved); one
  written with other STREAM_FIELDS (the data order) is restored with a warning. Returns
  None when the directory holds no checkpoint.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      saved_config = manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))['config']
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Checkpoint %d: config unreadable (%s); moved to %s', step,
                      first_line(e, 200), _set_aside(manager, step))
      continue
    if config is not None:
      checkpoint_shapes.check_compatible(saved_config, config, manager.directory)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
          metadata=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      # Arrays of other names or shapes are another model, not damage: refused, nothing moved.
      checkpoint_shapes.check_state(manager, step, abstract_state)
      logging.warning('Checkpoint %d is unreadable (%s); moved to %s and trying the one before',
                      step, first_line(e, 200), _set_aside(manager, step))
      continue
    changes = checkpoint_shapes.stream_changes(saved_config, config) if config else []
    if changes:
      logging.warning('Checkpoint %d was written with other data settings (%s): the input stream '
                      'goes on at its saved position in the stream these settings give, so the '
                      "data order is not the uninterrupted run's (parameters, optimizers and RNG "
                      'resume exactly). Pass the same settings to resume exactly.', step,
                      '; '.join(changes))
    return Restored(restored['state'], dict(restored['data'] or {}),
                    dict(restored['metadata'] or {}))
  return None


def abstract_like(state_fn, sharding) -> GANTrainState:
  """ShapeDtypeStructs (with `sharding`) of the state that `state_fn()` would build."""
  shapes = jax.eval_shape(state_fn)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def open_for_reading(directory: epath.PathLike) -> ocp.CheckpointManager:
  """A manager for reading a checkpoint directory; it knows every item's handler."""
  handlers = {'state': ocp.StandardCheckpointHandler(),
              'generator': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler(),
              'data': ocp.JsonCheckpointHandler(), 'metadata': ocp.JsonCheckpointHandler()}
  options = ocp.CheckpointManagerOptions(create=False)
  return ocp.CheckpointManager(epath.Path(directory), options=options, item_handlers=handlers)


def local_target(manager: ocp.CheckpointManager, step: int, item: str) -> Any:
  """The saved arrays of `item` as restore targets replicated over this process's devices.

  Saved shardings name the devices of the run that wrote them (maybe a pod slice); evaluation on
  another machine restores onto its own devices instead.
  """
  replicated = sharding.replicated(sharding.create_mesh(jax.local_devices()))
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
                      manager.item_metadata(step)[item])


def load_generator(workdir: epath.PathLike, step: Optional[int] = None, use_ema: bool = True):
  """Restores G alone (no optimizers, no D) and the config it was trained with.

  Args:
    workdir: a training workdir (local or gs://).
    step: the checkpoint step; None for the newest.
    use_ema: the EMA weights (default) or the raw ones.
  Returns:
    (config, generator module, params, mutable collections, step). With progressive growing
    the module is the stage that trained the step's last G step (progressive.sampling_generator).
  """
  directory = checkpoint_dir(workdir)
  steps = []
  if directory.exists():
    manager = open_for_reading(directory)
    steps = manager.all_steps()
  if not steps:
    raise ConfigError(f'no checkpoint in {directory}: pass the --workdir that training wrote')
  step = max(steps) if step is None else step
  if step not in steps:
    raise ConfigError(f'no checkpoint of step {step} in {directory}: use one of {sorted(steps)}')
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        generator=ocp.args.StandardRestore(local_target(manager, step, 'generator')),
        config=ocp.args.JsonRestore()))
  except Exception as e:  # pylint: disable=broad-except
    older = sorted(s for s in steps if s != step)
    raise ConfigError(f'checkpoint {step} in {directory} cannot be read '
                      f'({first_line(e, 200)}): pass --step with one of {older}') from e
  config = ml_collections.ConfigDict(restored['config'])
  generator = restored['generator']
  params = generator['ema_params'] if use_ema else generator['params']
  return config, progressive.sampling_generator(config, step), params, generator['state'], step


# ----------------------------------------------------------------------------------------------
# The best checkpoint by an evaluation metric (eval.best_metric): WORKDIR/best, one step kept,
# holding the generator item (as above), the config and metadata {step, metric, value, scores}.

BEST_DIR = 'best'
BEST_ITEMS = ('generator', 'config', 'metadata')


def best_checkpoint_dir(workdir: epath.PathLike) -> epath.Path:
  """WORKDIR/best as an absolute path (gs:// as it is)."""
  return checkpoint_dir(workdir).parent / BEST_DIR


def create_best_manager(workdir: epath.PathLike) -> ocp.CheckpointManager:
  """A synchronous manager over WORKDIR/best that keeps one step."""
  options = ocp.CheckpointManagerOptions(preservation_policy=policies.LatestN(1), create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(best_checkpoint_dir(workdir), options=options,
                               item_names=BEST_ITEMS)


def read_best(manager: ocp.CheckpointManager) -> Optional[Dict[str, Any]]:
  """The metadata of the kept best checkpoint, or None when there is none."""
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
  return dict(restored['metadata'] or {})


def save_best(manager: ocp.CheckpointManager, state: GANTrainState, config,
              metadata: Dict[str, Any]) -> None:
  """Replaces the kept best checkpoint with G of `state` (every process must call it)."""
  step = int(state.step)
  for old in manager.all_steps():
    if old >= step:  # A resumed run's better step can be older; Orbax saves only newer steps.
      manager.delete(old)
  generator = {'ema_params': state.ema_g_params, 'params': state.g_params, 'state': state.g_state}
  manager.save(step, args=ocp.args.Composite(
      generator=ocp.args.StandardSave(generator), config=ocp.args.JsonSave(config.to_dict()),
      metadata=ocp.args.JsonSave(metadata)), force=True)
  manager.wait_until_finished()


def load_best_generator(workdir: epath.PathLike, use_ema: bool = True):
  """Restores G alone from WORKDIR/best.

  Returns:
    (config, generator module, params, mutable collections, step, metadata) where metadata names
    the metric and value that made it the best.
  """
  directory = best_checkpoint_dir(workdir)
  steps = []
  if directory.exists():
    manager = open_for_reading(directory)
    steps = manager.all_steps()
  if not steps:
    raise ConfigError(f'no best checkpoint in {directory}: train with --config.eval.every_steps '
                      'and --config.eval.best_metric set, or evaluate without --best')
  step = max(steps)
  restored = manager.restore(step, args=ocp.args.Composite(
      generator=ocp.args.StandardRestore(local_target(manager, step, 'generator')),
      config=ocp.args.JsonRestore(), metadata=ocp.args.JsonRestore()))
  config = ml_collections.ConfigDict(restored['config'])
  generator = restored['generator']
  params = generator['ema_params'] if use_ema else generator['params']
  return (config, progressive.sampling_generator(config, step), params, generator['state'], step,
          dict(restored['metadata'] or {}))


# ----------------------------------------------------------------------------------------------
# Keeping WORKDIR/best by a score. Which way a score is better is the metric registry's
# (sagan_jax.evaluation.registry), imported when first needed: restoring a checkpoint does not
# load the metrics.


def _metric_registry():
  from sagan_jax.evaluation import registry  # pylint: disable=g-import-not-at-top
  return registry


def check_best_metric(metric: str) -> None:
  """ConfigError unless `metric` is a score that ranks checkpoints."""
  registry = _metric_registry()
  if registry.score_direction(metric) is None:
    raise ConfigError(f'eval.best_metric={metric!r} cannot rank checkpoints: choose one of '
                      f'{", ".join(registry.ranking_scores())}, or an empty string for no best '
                      'checkpoint')


class BestCheckpoint:
  """Keeps WORKDIR/best: G of the evaluated step with the best `metric` score so far.

  'fid', 'kid', 'fd_classifier' and 'intra_fd_classifier' are better lower; 'is', 'precision',
  'recall', 'class_accuracy' and 'worst_class_accuracy' higher (the registry says so for every
  score). A kept checkpoint chosen by
  another metric is replaced by the next evaluation. With several processes, process 0's decision
  holds for all.
  """

  def __init__(self, workdir: epath.PathLike, metric: str):
    check_best_metric(metric)
    registry = _metric_registry()
    self.metric = metric
    self.lower_is_better = registry.score_direction(metric) == registry.LOWER
    self.manager = create_best_manager(workdir)
    self.best = read_best(self.manager)

  def is_better(self, value: float) -> bool:
    if not float('-inf') < value < float('inf'):  # NaN or infinite: never the best.
      return False
    if self.best is None or self.best.get('metric') != self.metric:
      return True
    return value < self.best['value'] if self.lower_is_better else value > self.best['value']

  def update(self, state: GANTrainState, config, scores: Dict[str, float]) -> bool:
    """Saves G of `state` when `scores` beat the kept one; True when it did (all processes)."""
    if self.metric not in scores:
      return False
    better = self.is_better(scores[self.metric])
    if jax.process_count() > 1:
      # pylint: disable=g-import-not-at-top
      from jax.experimental import multihost_utils
      import numpy as np
      better = bool(multihost_utils.broadcast_one_to_all(np.int32(better)))
    if better:
      step = int(state.step)
      metadata = {'step': step, 'metric': self.metric, 'value': float(scores[self.metric]),
                  'scores': {k: float(v) for k, v in scores.items()}}
      save_best(self.manager, state, config, metadata)
      self.best = metadata
      logging.info('New best checkpoint: %s=%.6g at step %d (%s)', self.metric,
                   scores[self.metric], step, self.manager.directory)
    return better
