"""The next global batches, built and on the devices while the current step runs.

A background thread takes this process's host batches from the training iterator, assembles each
into a global jax.Array sharded over the mesh (sharding.make_global_batch: several processes each
give their share) and queues `depth` of them ahead of the loop, in the manner of flax's
`prefetch_to_device` and big_vision's prefetch iterator. Each queued batch carries the iterator's
position after it, so a checkpoint records the position of the last batch the loop *used*, not of
the ones read ahead: a resumed run continues exactly.
"""

import queue
import threading
from typing import Any, Dict, Iterator, Tuple

import jax

from sagan_jax import sharding

_END = object()


class DevicePrefetcher:
  """Iterates (global batch, position after it); an error in the thread is raised by `next`."""

  def __init__(self, iterator: Iterator[Dict[str, Any]], mesh, depth: int = 2):
    """`depth` batches ahead; 0: no thread, each batch is built when `next` asks for it."""
    self._iterator, self._mesh, self._depth = iterator, mesh, depth
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()
    self._thread = None
    if depth:
      self._thread = threading.Thread(target=self._fill, name='device_prefetch', daemon=True)
      self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _fill(self) -> None:
    try:
      for host_batch in self._iterator:
        batch = sharding.make_global_batch(host_batch, self._mesh)
        if not self._put((batch, self._iterator.position)):
          return
      self._put(_END)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the loop's thread)
      self._put(e)

  def __iter__(self):
    return self

  def __next__(self) -> Tuple[Dict[str, jax.Array], Any]:
    if not self._depth:
      batch = sharding.make_global_batch(next(self._iterator), self._mesh)
      return batch, self._iterator.position
    item = self._queue.get()
    if item is _END:
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self) -> None:
    """Stops the thread (the batches it read ahead are dropped)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
