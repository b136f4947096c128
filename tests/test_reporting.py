"""sagan_jax.reporting: one progress line with window means, and the optional profiler trace."""

import os

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from sagan_jax import reporting


class _Writer:
  """Records what the progress logger writes."""

  def __init__(self):
    self.scalars = []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))


def _metrics(d_loss, g_loss, finite=True):
  return {'train/d_loss': jnp.float32(d_loss), 'train/g_loss': jnp.float32(g_loss),
          'train/all_finite': jnp.bool_(finite)}


def test_scalars_are_window_means_without_non_finite_steps_and_one_line(monkeypatch):
  lines = []
  monkeypatch.setattr(logging, 'info', lambda fmt, *args: lines.append(fmt % args))
  writer = _Writer()
  progress = reporting.ProgressLogger(writer, first_step=0, num_steps=8)
  for d_loss, g_loss in ((1.0, -1.0), (2.0, -3.0), (3.0, -5.0)):
    progress.add(_metrics(d_loss, g_loss))
  progress.add(_metrics(np.nan, np.inf, finite=False))  # Skipped: not in the means.
  written = progress(4, {'train/nonfinite_skips': 1})
  assert written['train/d_loss'] == 2.0 and written['train/g_loss'] == -3.0
  assert written['train/nonfinite_skips'] == 1 and written['train/steps_per_sec'] > 0
  assert 'train/all_finite' not in written and 'count' not in written
  # The next window starts afresh.
  progress.add(_metrics(10.0, 0.5))
  assert progress(5, {})['train/d_loss'] == 10.0
  assert [step for step, _ in writer.scalars] == [4, 5]
  assert len(lines) == 2 and lines[0].startswith('step 4/8  ') and 'd_loss=2.0000' in lines[0]
  assert 'ETA' in lines[0] and 'g_loss=-3.0000' in lines[0]


def test_profiler_writes_a_trace_of_the_configured_steps(tmp_path):
  config = ml_collections.ConfigDict({'profile_num_steps': 2, 'profile_first_step': 2})
  profile = reporting.create_profiler(config, epath.Path(tmp_path))
  x = jnp.ones((64, 64))
  for step in range(1, 6):
    x = (x @ x).block_until_ready() / 64
    profile(step)
  traces = [f for _, _, files in os.walk(tmp_path / 'plugins' / 'profile') for f in files]
  assert any(f.endswith('.xplane.pb') for f in traces), traces


def test_no_profiler_when_off(tmp_path):
  config = ml_collections.ConfigDict({'profile_num_steps': 0, 'profile_first_step': 2})
  profile = reporting.create_profiler(config, epath.Path(tmp_path))
  for step in range(1, 4):
    profile(step)
  assert not os.listdir(tmp_path)
