"""DevicePrefetcher: global batches ahead of the loop, each with the position after it."""

import jax
import numpy as np
import pytest

from sagan_jax import device_prefetch
from sagan_jax import sharding
from sagan_jax.errors import ConfigError


class _Numbers:
  """Host batches {'image': [1, 8, 2], 'label': [1, 8]} holding their index; fails if asked to."""

  def __init__(self, count, fail_at=None):
    self.position, self._count, self._fail_at = 0, count, fail_at

  def __iter__(self):
    return self

  def __next__(self):
    if self.position == self._fail_at:
      raise ConfigError('no readable image')
    if self.position == self._count:
      raise StopIteration
    value = self.position
    self.position += 1
    return {'image': np.full((1, 8, 2), value, np.float32),
            'label': np.full((1, 8), value, np.int32)}


@pytest.mark.parametrize('depth', [0, 1, 2])
def test_batches_come_in_order_on_the_mesh_with_their_positions(depth):
  mesh = sharding.create_mesh()
  with device_prefetch.DevicePrefetcher(_Numbers(5), mesh, depth) as batches:
    seen = list(batches)
  assert [(int(np.asarray(batch['label'])[0, 0]), position) for batch, position in seen] == [
      (i, i + 1) for i in range(5)]
  for batch, _ in seen:
    for array in batch.values():
      assert isinstance(array, jax.Array)
      assert array.sharding.is_equivalent_to(sharding.step_batch_sharding(mesh), array.ndim)


def test_an_error_in_the_thread_reaches_the_loop_after_the_good_batches():
  batches = device_prefetch.DevicePrefetcher(_Numbers(5, fail_at=2), sharding.create_mesh(), 2)
  assert [position for _, position in (next(batches), next(batches))] == [1, 2]
  with pytest.raises(ConfigError, match='no readable image'):
    next(batches)
  batches.close()
