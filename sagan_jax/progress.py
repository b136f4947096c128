"""Progress lines for the stages that take more than a few seconds: count, share, rate and ETA.

  with progress.Progress('classifier training', total=781, unit='steps') as bar:
    for step in range(781):
      ...
      bar.update(accuracy=lambda: f'{float(hits) / seen:.3f}')  # Read only when logged.

logs, at most every `every_secs` seconds and once at the end,
`classifier training: 300/781 steps (38%), 4.1 steps/s, ETA 1:57, accuracy 0.840`
through absl logging (the tools' short format, or the full one with --log_format=full), on
process 0 only: on a TPU slice or a GPU cluster one line per interval, not one per host. The
training loop has its own line (reporting.ProgressLogger); this one serves classifier training,
sampling and feature extraction in evaluation and reference statistics. Times read M:SS or
H:MM:SS (format_seconds), as in the training loop's line.
"""

import time
from typing import Optional

from absl import logging
import jax

EVERY_SECS = 10.0  # At most one line per stage every this many seconds.


def format_seconds(seconds: float) -> str:
  """'1:57', '1:02:03' (M:SS, or H:MM:SS from an hour on): every ETA and duration of the logs."""
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}:{minutes:02d}:{secs:02d}' if hours else f'{minutes}:{secs:02d}'


def _rate(rate: float) -> str:
  return f'{rate:.3g}' if rate < 100 else f'{rate:,.0f}'


class Progress:
  """Counts work done towards `total` and logs progress lines (module doc)."""

  def __init__(self, what: str, total: int, unit: str = 'steps',
               every_secs: float = EVERY_SECS, enabled: Optional[bool] = None):
    self.what, self.total, self.unit, self.every_secs = what, total, unit, every_secs
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.count, self._postfix = 0, {}
    self._start = self._last = time.perf_counter()

  def __enter__(self) -> 'Progress':
    return self

  def __exit__(self, *exc) -> None:
    if exc[0] is None:
      self.close()

  def line(self) -> str:
    """The progress line as it stands."""
    elapsed = max(time.perf_counter() - self._start, 1e-9)
    rate = self.count / elapsed
    text = f'{self.what}: {self.count}/{self.total} {self.unit}'
    text += f' ({100 * self.count / max(self.total, 1):.0f}%), {_rate(rate)} {self.unit}/s'
    if self.count < self.total:
      eta = (self.total - self.count) / rate if rate > 0 else None
      text += f', ETA {format_seconds(eta) if eta is not None else "?"}'
    else:
      text += f', done in {format_seconds(elapsed)}'
    for name, value in self._postfix.items():
      text += f', {name.replace("_", " ")} {value() if callable(value) else value}'
    return text

  def update(self, n: int = 1, **postfix) -> None:
    """Adds `n` done; `postfix` (name=text, or a function giving the text, called only when a
    line is logged: a device value is then not fetched at every step) follows the ETA."""
    self.count += n
    self._postfix.update(postfix)
    now = time.perf_counter()
    if self.enabled and now - self._last >= self.every_secs and self.count < self.total:
      self._last = now
      logging.info('%s', self.line())

  def close(self) -> None:
    """Logs the final line (count, rate, time taken)."""
    if self.enabled:
      logging.info('%s', self.line())
