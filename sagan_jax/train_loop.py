"""The training loop: validation, resume, the compiled step, logs, sample grids and checkpoints."""

import functools
import json
import signal
import time
from typing import Any, Callable, Dict, NamedTuple, Optional

from absl import logging
from clu import metric_writers
from etils import epath
import jax
from jax.experimental import multihost_utils

from sagan_jax import checkpointing
from sagan_jax import config_check
from sagan_jax import device_prefetch
from sagan_jax import evaluation
from sagan_jax import input_pipeline
from sagan_jax import models
from sagan_jax import progressive
from sagan_jax import reporting
from sagan_jax import sampling
from sagan_jax import sharding
from sagan_jax import train
from sagan_jax import train_state
from sagan_jax.errors import ConfigError
from sagan_jax.errors import first_line
from sagan_jax.errors import TrainingError


class _PreemptionWatcher:
  """Tells the loop when to save and stop because the machine is being taken away.

  A single process turns SIGTERM (sent by TPU VMs, GCE and SLURM before preemption) into a flag.
  Several processes use JAX's preemption sync point instead: the coordination service catches
  the signal on any host and all processes agree on the step at which they save together.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if self._multi:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: leave signals alone.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def check(self, step: int) -> bool:
    """True once a preemption notice has reached every process (call it at every step)."""
    if self._multi and not self.requested:
      try:
        self.requested = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # The preemption service is off: only explicit stops apply.
        self._multi = False
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _save_due(manager, config, step: int) -> bool:
  """Whether the checkpoint manager's policy (checkpointing.save_decision_policy) saves `step`.

  With several processes the policy is asked every `log_every_steps` steps and at the fixed
  interval's steps only, the same steps on every process: its time-based part makes process 0
  decide and tell the others, so the processes meet there and nowhere else.
  """
  every = config.checkpoint_every_steps
  at_interval = bool(every) and step % every == 0
  if jax.process_count() > 1 and step % config.log_every_steps and not at_interval:
    return False
  return manager.should_save(step)


class _NonFiniteGuard:
  """Acts on the step's `train/all_finite` flag as `train.on_nonfinite` says.

  'stop': raises TrainingError naming the step, before the state can reach a checkpoint. 'skip':
  the step already kept the state from before it (train.create_train_step); this logs it and
  counts the skipped batches (saved in the checkpoints' metadata).
  """

  def __init__(self, action: str, skips: int = 0):
    self.action, self.skips, self._checked = action, skips, -1

  def check(self, step: int, metrics, manager) -> None:
    if step == self._checked or bool(metrics['train/all_finite']):
      return
    self._checked = step
    if self.action == 'skip':
      self.skips += 1
      logging.warning('Non-finite loss or parameters at step %d: kept the state from before the '
                      'step and skipped its batch (%d skipped so far).', step, self.skips)
      return
    manager.wait_until_finished()
    newest = manager.latest_step()
    raise TrainingError(
        f'non-finite loss or parameters at step {step}; the newest checkpoint '
        f'(step {newest}) is the last good one and stays the newest: lower the learning rates '
        f'(--config.train.g_lr / d_lr) or check the data, then run again to resume from it '
        "(or set --config.train.on_nonfinite=skip to skip such batches)")


def _check_workdir(workdir: epath.Path) -> None:
  """ConfigError unless WORKDIR can be created and written (before anything else happens)."""
  probe = workdir / f'.write_test.{jax.process_index()}'
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise ConfigError(f'cannot write to --workdir={workdir} ({e.strerror or e}): pass a workdir '
                      'you can write to, with free space') from e


def _save(manager, state, config, data, metadata) -> None:
  """checkpointing.save, turning a failed write into a TrainingError (training must not go on)."""
  try:
    manager.check_for_errors()  # An earlier asynchronous write that failed.
    checkpointing.save(manager, state, config, data, metadata)
  except Exception as e:  # pylint: disable=broad-except
    raise TrainingError(
        f'could not write the checkpoint of step {int(state.step)} to {manager.directory} '
        f'({first_line(e)}); the newest complete checkpoint is step '
        f'{manager.latest_step()}: free space or fix the permissions, then run again') from e


def _restore_or_create(config, manager, generator, discriminator, mesh):
  """Resume order: the newest readable checkpoint in WORKDIR, else a fresh state from config.seed.

  Returns (state, restored or None).
  """
  rng = jax.random.PRNGKey(config.seed)

  def init_fn():
    return train_state.create_train_state(config, generator, discriminator, rng)

  abstract = checkpointing.abstract_like(init_fn, sharding.replicated(mesh))
  restored = checkpointing.restore_latest(manager, abstract, config)
  if restored is None:
    return train_state.create_sharded_train_state(config, generator, discriminator, rng, mesh), None
  return restored.state, restored


def train_and_evaluate(config, workdir: str) -> train.GANTrainState:
  """Trains SAGAN from `config`, resuming from WORKDIR's newest checkpoint; returns the state.

  The continuation of a resumed run is exact: parameters, optimizers, RNG and the input stream's
  position come from the checkpoint. SIGTERM saves a checkpoint at the current step and returns.
  A non-finite loss or parameter raises TrainingError without saving.
  """
  workdir = epath.Path(workdir)
  mesh = sharding.create_mesh()
  # Every check of user input comes before the workdir is touched.
  config_check.check_config(config, mesh)
  input_pipeline.check_source(config.data)  # The data is there.
  generator, discriminator = models.create_models(config)
  _check_workdir(workdir)
  manager = checkpointing.create_checkpoint_manager(workdir, config)
  state, restored = _restore_or_create(config, manager, generator, discriminator, mesh)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  first_step = int(state.step)
  logging.info('Starting at step %d of %d (%d devices, %d processes) in %s', first_step,
               config.train.num_steps, mesh.devices.size, jax.process_count(), workdir)
  position = checkpointing.data_position(restored, first_step)
  # Without a saved position the stream restarts at 0 with a seed of its own.
  data_seed = config.seed if position is not None or not first_step else config.seed + first_step
  grid_inputs = sampling.grid_latents(config.sample, config.model.z_dim, config.data.num_classes,
                                      config.seed)
  periodic = _Periodic(
      write_grid=functools.partial(sampling.write_grid, workdir, writer, grid_inputs=grid_inputs,
                                   use_ema=config.sample.use_ema,
                                   rows=min(config.sample.num_rows, config.data.num_classes)),
      progress=reporting.ProgressLogger(writer, first_step, config.train.num_steps),
      profile=reporting.create_profiler(config, workdir),
      # Evaluation during training (eval.every_steps; None when off): the helpers at the end.
      evaluate=_create_periodic_evaluation(config, workdir, generator, mesh, writer))
  stages = _Stages(config, mesh, data_seed)
  state, stopped = _run_steps(config, mesh, manager, state, restored, position, stages, periodic)
  if config.sample.final_per_class and not stopped:  # From the last stage's G.
    sample_fn = sampling.create_sample_fn(progressive.sampling_generator(config, int(state.step)))
    sampling.write_final_samples(workdir, config, sample_fn, state)
  writer.flush()
  return state


class _Periodic(NamedTuple):
  """What the loop does besides stepping, each at its own interval."""
  write_grid: Callable[..., None]  # sample_every_steps
  progress: reporting.ProgressLogger  # every step; logs every log_every_steps
  profile: Callable[[int], None]  # profile_first_step ...
  evaluate: Optional['_PeriodicEvaluation']  # eval.every_steps, or None


class _Stage(NamedTuple):
  """What the loop trains with up to `end_step`: a stage of progressive growing, or the run."""
  end_step: int
  train_iter: Any  # The input stream, at the stage's resolution.
  train_step: Callable[..., Any]  # Compiled.
  sampler: models.Generator  # G of the stage with images at data.resolution: grids, evaluation.
  sample_fn: Callable[..., Any]


class _Stages:
  """Builds the stage that trains a given step: with progressive growing (sagan_jax.progressive)
  its own networks, compiled step, input stream and sampler; without, the whole run's."""

  def __init__(self, config, mesh, data_seed: int):
    self.config, self.mesh, self.data_seed = config, mesh, data_seed
    self.schedule = progressive.schedule_from_config(config)

  def enter(self, step: int, position: Optional[int]) -> _Stage:
    """The stage of G step `step` + 1 (state.step == step); its stream continues at `position`."""
    config, schedule = self.config, self.schedule
    end_step, resolution = config.train.num_steps, None
    if schedule is None:
      generator, discriminator = models.create_models(config)
    else:
      index = schedule.stage_index(step)
      logging.info('%s', progressive.describe_stage(schedule, index))
      generator, discriminator = progressive.stage_models(config, index)
      resolution = schedule.resolutions[index]
      if index + 1 < schedule.num_stages:
        end_step = schedule.stage_start(index + 1)
    train_iter = input_pipeline.create_train_iterator(config, seed=self.data_seed,
                                                      position=position, resolution=resolution)
    train_step = train.compile_train_step(
        train.create_train_step(config, generator, discriminator, self.mesh), self.mesh)
    sampler = generator.clone(output_resolution=config.data.resolution) if resolution else generator
    return _Stage(end_step, train_iter, train_step, sampler, sampling.create_sample_fn(sampler))


class _LoopState:
  """What the loop carries from step to step and across stages: the non-finite guard, the
  newest scalars and scores, the training time, the metrics checked one step late."""

  def __init__(self, config, manager, restored):
    saved_metadata = restored.metadata if restored else {}
    self.config, self.manager = config, manager
    self.elapsed = float(saved_metadata.get('elapsed_seconds', 0.0))
    self.guard = _NonFiniteGuard(config.train.on_nonfinite,
                                 int(saved_metadata.get('nonfinite_skips', 0)))
    self.start_time = time.monotonic()
    self.previous_metrics, self.last_scalars = None, {}
    self.eval_scores: Dict[str, float] = {}  # The newest evaluation's scores.

  def after_step(self, step: int, state, metrics, position, stage: _Stage, periodic: _Periodic,
                 preemption: _PreemptionWatcher) -> bool:
    """Logs, grids, evaluation and the checkpoint of `step`, each when due; True: stop (SIGTERM)."""
    config, guard, manager = self.config, self.guard, self.manager
    if self.previous_metrics is not None:  # Checked one step late: the host never waits here.
      guard.check(step - 1, self.previous_metrics, manager)
    self.previous_metrics = metrics
    periodic.progress.add(metrics)
    periodic.profile(step)
    last = step == config.train.num_steps
    if step % config.log_every_steps == 0 or last:
      self.last_scalars = periodic.progress(step, {'train/nonfinite_skips': guard.skips}
                                            if guard.action == 'skip' else {})
    if step % config.sample_every_steps == 0 or last:
      periodic.write_grid(step, state=state, sample_fn=stage.sample_fn)
    if periodic.evaluate is not None and (step % config.eval.every_steps == 0 or last):
      self.eval_scores = periodic.evaluate(step, state)
    stop = preemption.check(step)
    if last or stop or _save_due(manager, config, step):
      guard.check(step, metrics, manager)
      metadata = {'step': step, 'wall_time': time.time(),
                  'elapsed_seconds': self.elapsed + time.monotonic() - self.start_time,
                  'scalars': self.last_scalars, 'eval': self.eval_scores,
                  'nonfinite_skips': guard.skips}
      _save(manager, state, config, checkpointing.gather_positions(position), metadata)
    if stop:
      logging.warning('SIGTERM: saved a checkpoint at step %d; stopping.', step)
    return stop


def _run_steps(config, mesh, manager, state, restored, position, stages: _Stages,
               periodic: _Periodic):
  """Steps to train.num_steps or to a SIGTERM, stage by stage, saving as the policy says;
  (state, stopped). `position`: the input stream's, None to start it."""
  loop = _LoopState(config, manager, restored)
  with _PreemptionWatcher() as preemption:
    while int(state.step) < config.train.num_steps and not preemption.requested:
      stage = stages.enter(int(state.step), position)
      if periodic.evaluate is not None:
        periodic.evaluate.evaluator.set_generator(stage.sampler)
      # The next global batches are built on a thread while the step runs (depth data.prefetch);
      # at a new stage those read ahead at the old resolution are dropped.
      with device_prefetch.DevicePrefetcher(stage.train_iter, mesh,
                                            config.data.get('prefetch', 2)) as batches:
        for step in range(int(state.step) + 1, stage.end_step + 1):
          with jax.profiler.StepTraceAnnotation('train', step_num=step):
            batch, position = next(batches)
            state, metrics = stage.train_step(state, batch)
          if loop.after_step(step, state, metrics, position, stage, periodic, preemption):
            break
    _wait_for_saves(manager)
  return state, preemption.requested


def _wait_for_saves(manager) -> None:
  """Blocks until the asynchronous saves are written; TrainingError when one failed."""
  try:
    manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as e:  # pylint: disable=broad-except
    raise TrainingError(f'the last checkpoint could not be written to {manager.directory} '
                        f'({first_line(e)}); the newest complete one is step '
                        f'{manager.latest_step()}: free space or fix the permissions') from e


# ----------------------------------------------------------------------------------------------
# Evaluation during training (eval.every_steps): scores to the log and TensorBoard (eval/...,
# with per-class accuracies), scores and details to WORKDIR/eval/train_step_N.json, and
# WORKDIR/best kept by eval.best_metric.


def _create_periodic_evaluation(config, workdir: epath.Path, generator, mesh, writer):
  """`evaluate_fn(step, state) -> scores`, or None when eval.every_steps is 0 or nothing can run.

  Built before the first step, so bad evaluation settings stop training before it starts.
  """
  eval_config = config.eval
  if not eval_config.every_steps:
    return None
  evaluator = evaluation.create_evaluator(config, generator, mesh,
                                          evaluation.settings_from_config(config), workdir)
  if not evaluator.enabled:
    logging.warning('eval.every_steps=%d but no metric can run (%s): no evaluation during '
                    'training', eval_config.every_steps, '; '.join(
                        f'{k}: {v}' for k, v in evaluator.skipped.items()))
    return None
  best = None
  if eval_config.best_metric:
    checkpointing.check_best_metric(eval_config.best_metric)
    metric = evaluation.metric_of_score(eval_config.best_metric)
    if metric in evaluator.metric_names:
      best = checkpointing.BestCheckpoint(workdir, eval_config.best_metric)
    else:
      logging.warning('eval.best_metric=%s is not evaluated (%s): no best checkpoint is kept',
                      eval_config.best_metric, evaluator.skipped.get(metric, 'not in eval.metrics'))
  return _PeriodicEvaluation(config, workdir, evaluator, best, writer)


class _PeriodicEvaluation:
  """`evaluate(step, state) -> scores`: the log, TensorBoard, the JSON file and WORKDIR/best.

  `evaluator` samples with the G it was built with, or the one set by its set_generator (each
  stage's, with progressive growing).
  """

  def __init__(self, config, workdir: epath.Path, evaluator, best, writer):
    self.config, self.workdir, self.evaluator, self.best = config, workdir, evaluator, best
    self.writer = writer

  def __call__(self, step: int, state) -> Dict[str, float]:
    config, workdir, evaluator, best, writer = (self.config, self.workdir, self.evaluator,
                                                self.best, self.writer)
    start = time.perf_counter()
    scores = evaluator(state.generator_params(config.eval.use_ema), state.g_state)
    accuracy = evaluator.details.get('class_accuracy')
    scalars = {f'eval/{k}': v for k, v in scores.items()}
    if accuracy:  # eval/class_accuracy/<index>_<name>
      scalars.update(evaluation.class_accuracy_scalars(accuracy, 'eval/class_accuracy'))
    writer.write_scalars(step, scalars)
    logging.info('eval at step %d (%d samples, %.1f s): %s%s', step, config.eval.num_samples,
                 time.perf_counter() - start, evaluation.format_scores(scores),
                 f'; {evaluation.worst_class_summary(accuracy)}' if accuracy else '')
    if jax.process_index() == 0:
      path = epath.Path(workdir) / 'eval' / f'train_step_{step:07d}.json'
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps({'step': step, 'num_samples': config.eval.num_samples,
                                  'scores': scores, 'details': evaluator.details},
                                 indent=2, sort_keys=True))
    if best is not None:
      best.update(state, config, scores)
    return scores
