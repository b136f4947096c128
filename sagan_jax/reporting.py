"""The training loop's reporting: one progress line with window means, and a profiler trace."""

import time
from typing import Any, Dict

from absl import logging
from clu import periodic_actions
from etils import epath
import jax
import jax.numpy as jnp

from sagan_jax import progress


@jax.jit
def _finite_metrics(metrics: Dict[str, Any]) -> Dict[str, Any]:
  """A step's metrics, zero when the step was not finite, with 'count' 1 or 0 accordingly."""
  finite = metrics['train/all_finite']
  kept = {k: jnp.where(finite, v, 0.0) for k, v in metrics.items() if k != 'train/all_finite'}
  return {**kept, 'count': finite.astype(jnp.float32)}


_add_metrics = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))


class ProgressLogger:
  """The one progress line every `log_every_steps`: step N/T, steps/s, ETA and the losses.

  Scalars are means over the steps since the last line (summed on the devices as the steps run,
  so the host never waits for a step), written to TensorBoard with `train/steps_per_sec`.
  """

  def __init__(self, writer, first_step: int, num_steps: int):
    self.writer, self.num_steps = writer, num_steps
    self.last_step, self.last_time = first_step, time.perf_counter()
    self._sums = None

  def add(self, metrics: Dict[str, Any]) -> None:
    """Adds one step's metrics to the window (asynchronously, on the devices)."""
    kept = _finite_metrics(metrics)
    self._sums = kept if self._sums is None else _add_metrics(self._sums, kept)

  def __call__(self, step: int, extra: Dict[str, float]) -> Dict[str, float]:
    """Logs and writes the window's means (and `extra` scalars); returns what it wrote."""
    now = time.perf_counter()
    steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    sums = jax.device_get(self._sums or {})
    self._sums = None
    count = max(float(sums.pop('count', 0.0)), 1.0)  # Steps skipped as non-finite do not count.
    scalars = {k: float(v) / count for k, v in sums.items()}
    scalars.update(extra)
    scalars['train/steps_per_sec'] = steps_per_sec
    self.writer.write_scalars(step, scalars)
    eta = (self.num_steps - step) / max(steps_per_sec, 1e-9)
    losses_text = ' '.join(f'{k.split("/")[-1]}={v:.4f}' for k, v in sorted(scalars.items())
                           if 'loss' in k)
    logging.info('step %d/%d  %.2f steps/s  ETA %s  %s', step, self.num_steps, steps_per_sec,
                 progress.format_seconds(eta), losses_text)
    return scalars


def create_profiler(config, workdir: epath.Path):
  """clu's Profile action when `profile_num_steps` > 0: a trace in WORKDIR/plugins/profile."""
  num_steps = config.get('profile_num_steps', 0)
  if not num_steps or jax.process_index() > 0:
    return lambda step: None
  return periodic_actions.Profile(logdir=str(workdir), num_profile_steps=num_steps,
                                  profile_duration_ms=None, every_steps=None, every_secs=None,
                                  first_profile=config.profile_first_step)
