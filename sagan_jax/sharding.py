"""The device mesh, shardings of state and batches, and global batch assembly."""

from typing import Any, Mapping, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from sagan_jax.errors import ConfigError

DATA_AXIS = 'data'


def create_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A one-axis ('data') mesh over `devices` (default: every device of every process).

  Built with `Mesh` directly: its axis is Auto-sharded (`jax.make_mesh` now defaults to Explicit).
  """
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Shards the leading (example) axis over the mesh."""
  return NamedSharding(mesh, P(DATA_AXIS))


def step_batch_sharding(mesh: Mesh) -> NamedSharding:
  """A train step's batch is [d_steps, batch, ...]: the batch axis is sharded."""
  return NamedSharding(mesh, P(None, DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  """Raises ConfigError unless the global batch divides over processes and devices."""
  devices, processes = mesh.devices.size, jax.process_count()
  if global_batch % devices or global_batch % processes:
    raise ConfigError(
        f'train.batch_size={global_batch} does not divide over {devices} devices in {processes} '
        f'process(es): set --config.train.batch_size to a multiple of {devices}')


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> Any:
  """Assembles each process's [d_steps, local_batch, ...] arrays into global sharded arrays."""
  sharding = step_batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
