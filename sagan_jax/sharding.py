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


def check_batch_size(global_batch: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
  """Raises ConfigError unless the global batch divides over processes, devices and micro-batches.

  With gradient accumulation every device splits its share into `grad_accum_steps` micro-batches.
  """
  devices, processes = mesh.devices.size, jax.process_count()
  if grad_accum_steps < 1:
    raise ConfigError(f'train.grad_accum_steps={grad_accum_steps} must be at least 1: set '
                      '--config.train.grad_accum_steps=1')
  if global_batch % devices or global_batch % processes:
    raise ConfigError(
        f'train.batch_size={global_batch} does not divide over {devices} devices in {processes} '
        f'process(es): set --config.train.batch_size to a multiple of {devices}')
  if global_batch % (devices * grad_accum_steps):
    raise ConfigError(
        f'train.batch_size={global_batch} does not split into {grad_accum_steps} micro-batches '
        f'on each of {devices} devices: set --config.train.batch_size to a multiple of '
        f'{devices * grad_accum_steps} or --config.train.grad_accum_steps to a divisor of '
        f'{global_batch // devices}')


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> Any:
  """Assembles each process's [d_steps, local_batch, ...] arrays into global sharded arrays."""
  sharding = step_batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
