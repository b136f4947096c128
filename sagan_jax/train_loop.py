"""The training loop: validation, resume, the compiled step, logs, sample grids and checkpoints."""

import functools
import signal
import time
from typing import Any, Callable, Dict

from absl import logging
from clu import metric_writers
from clu import periodic_actions
from etils import epath
import jax
import numpy as np

from sagan_jax import checkpointing
from sagan_jax import input_pipeline
from sagan_jax import losses
from sagan_jax import models
from sagan_jax import sampling
from sagan_jax import sharding
from sagan_jax import train
from sagan_jax.errors import TrainingError


def _check_config(config, mesh) -> None:
  """The checks of user input that `create_models` does not make; run before the workdir is used."""
  sharding.check_batch_size(config.train.batch_size, mesh)
  losses.get_adversarial_loss(config.train.loss)
  input_pipeline.check_source(config.data)


def _format_eta(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m{seconds:02d}s'


class _ProgressLogger:
  """Logs 'step N/T, steps/s, ETA' and the scalars every `log_every_steps`."""

  def __init__(self, writer, first_step: int, num_steps: int):
    self.writer, self.num_steps = writer, num_steps
    self.last_step, self.last_time = first_step, time.perf_counter()

  def __call__(self, step: int, metrics: Dict[str, Any]) -> None:
    now = time.perf_counter()
    steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    scalars['train/steps_per_sec'] = steps_per_sec
    self.writer.write_scalars(step, scalars)
    eta = (self.num_steps - step) / max(steps_per_sec, 1e-9)
    losses_text = ' '.join(f'{k.split("/")[-1]}={v:.4f}' for k, v in sorted(scalars.items())
                           if 'loss' in k)
    logging.info('step %d/%d  %.2f steps/s  ETA %s  %s', step, self.num_steps, steps_per_sec,
                 _format_eta(eta), losses_text)


def _write_grid(workdir: epath.Path, writer, step: int, *, sample_fn: Callable[..., Any], state,
                grid_inputs, use_ema: bool, rows: int) -> None:
  z, labels = grid_inputs
  g_params = state.ema_g_params if use_ema else state.g_params
  images = sampling.to_uint8(sample_fn(g_params, state.g_state, z, labels))
  grid = sampling.image_grid(images, rows)
  writer.write_images(step, {'samples': grid[None]})
  if jax.process_index() == 0:
    (workdir / 'samples').mkdir(parents=True, exist_ok=True)
    sampling.save_png(workdir / 'samples' / f'step_{step:07d}.png', grid)


def _write_final_samples(workdir: epath.Path, config, sample_fn, state) -> None:
  """samples.npz: `final_per_class` samples of every class (uint8 images, int32 labels)."""
  labels = np.repeat(np.arange(config.data.num_classes, dtype=np.int32),
                     config.sample.final_per_class)
  g_params = state.ema_g_params if config.sample.use_ema else state.g_params
  images = sampling.generate(sample_fn, g_params, state.g_state, config.model.z_dim, labels,
                             jax.random.PRNGKey(config.seed + 1))
  if jax.process_index() == 0:
    with (workdir / 'samples.npz').open('wb') as f:
      np.savez(f, images=images, labels=labels)
    logging.info('Wrote %d samples to %s', len(labels), workdir / 'samples.npz')


class _PreemptionWatcher:
  """Turns SIGTERM (sent by TPU VMs, GCE and SLURM before preemption) into a flag the loop reads."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: leave signals alone.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_finite(step: int, metrics, manager) -> None:
  """Stops training at the first non-finite loss or parameter, before it reaches a checkpoint."""
  if not bool(metrics['train/all_finite']):
    newest = manager.latest_step()
    raise TrainingError(
        f'non-finite loss or parameters at step {step}; the newest checkpoint '
        f'(step {newest}) is the last good one and stays the newest: lower the learning rates '
        f'(--config.train.g_lr / d_lr) or check the data, then run again to resume from it')


def _restore_or_create(config, manager, generator, discriminator, mesh) -> train.GANTrainState:
  """Resume order: the newest checkpoint in WORKDIR, else a fresh state from config.seed."""
  rng = jax.random.PRNGKey(config.seed)

  def init_fn():
    return train.create_train_state(config, generator, discriminator, rng)

  abstract = checkpointing.abstract_like(init_fn, sharding.replicated(mesh))
  state = checkpointing.restore_latest(manager, abstract)
  if state is None:
    state = train.create_sharded_train_state(config, generator, discriminator, rng, mesh)
  return state


def train_and_evaluate(config, workdir: str) -> train.GANTrainState:
  """Trains SAGAN from `config`, resuming from WORKDIR's newest checkpoint; returns the state.

  SIGTERM saves a checkpoint at the current step and returns. A non-finite loss or parameter
  raises TrainingError without saving.
  """
  workdir = epath.Path(workdir)
  mesh = sharding.create_mesh()
  generator, discriminator = models.create_models(config)  # Validates config.model.
  _check_config(config, mesh)
  manager = checkpointing.create_checkpoint_manager(workdir, config)
  checkpointing.check_compatible(manager, config)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  state = _restore_or_create(config, manager, generator, discriminator, mesh)
  first_step = int(state.step)
  logging.info('Starting at step %d of %d (%d devices, %d processes) in %s', first_step,
               config.train.num_steps, mesh.devices.size, jax.process_count(), workdir)

  # A resumed run reads a stream seeded by its first step (exact data order: checkpoint issue).
  train_iter = input_pipeline.create_train_iterator(config, seed=config.seed + first_step)
  train_step = train.compile_train_step(
      train.create_train_step(config, generator, discriminator, mesh), mesh)
  sample_fn = sampling.create_sample_fn(generator)
  grid_inputs = sampling.grid_latents(config.sample, config.model.z_dim, config.data.num_classes,
                                      config.seed)
  write_grid = functools.partial(_write_grid, workdir, writer, sample_fn=sample_fn,
                                 grid_inputs=grid_inputs, use_ema=config.sample.use_ema,
                                 rows=min(config.sample.num_rows, config.data.num_classes))
  progress = _ProgressLogger(writer, first_step, config.train.num_steps)
  report_progress = periodic_actions.ReportProgress(num_train_steps=config.train.num_steps,
                                                    writer=writer)
  num_steps, previous_metrics = config.train.num_steps, None
  with _PreemptionWatcher() as preemption:
    for step in range(first_step + 1, num_steps + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = sharding.make_global_batch(next(train_iter), mesh)
        state, metrics = train_step(state, batch)
      if previous_metrics is not None:  # Checked one step late: the host never waits here.
        _check_finite(step - 1, previous_metrics, manager)
      previous_metrics = metrics
      report_progress(step)
      last = step == num_steps
      if step % config.log_every_steps == 0 or last:
        progress(step, metrics)
      if step % config.sample_every_steps == 0 or last:
        write_grid(step, state=state)
      if step % config.checkpoint_every_steps == 0 or last or preemption.requested:
        _check_finite(step, metrics, manager)
        checkpointing.save(manager, state, config)
      if preemption.requested:
        logging.warning('SIGTERM: saved a checkpoint at step %d; stopping.', step)
        break
    manager.wait_until_finished()
  if config.sample.final_per_class and not preemption.requested:
    _write_final_samples(workdir, config, sample_fn, state)
  writer.flush()
  return state
