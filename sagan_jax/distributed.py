"""Multi-process start-up: `jax.distributed.initialize` on TPU pod slices and GPU clusters.

Three ways in, decided by `initialize`:
- explicit: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (plain multi-node
  GPU runs; also how the tests run two processes on localhost);
- automatic: on a Cloud TPU VM, and under SLURM's srun with more than one task, jax reads the
  cluster from the environment;
- none: a single process (one machine with any number of local devices).
"""

import glob
import os
from typing import Optional

from absl import logging
import jax

from sagan_jax.errors import ConfigError


def _on_tpu_vm() -> bool:
  """A Cloud TPU VM: TPU devices are visible as /dev/accel* (v2-v4) or /dev/vfio (v5e and later)."""
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def _in_slurm_job_step() -> bool:
  """srun with several tasks: jax's SLURM cluster detection applies."""
  return 'SLURM_STEP_NODELIST' in os.environ and int(os.environ.get('SLURM_NTASKS', '1')) > 1


def set_cpu_devices(count: int) -> None:
  """Splits the host's CPU into `count` JAX devices (config.cpu_devices), before JAX starts.

  XLA's CPU backend runs one small step on one device with little parallelism inside it; as
  several devices, the batch is split over them and the cores run the parts side by side (the
  Fashion-MNIST demo's step runs 1.6x faster as 2 devices on 2 cores: README). It only changes the
  CPU backend: on GPU and TPU machines jax.devices() are the accelerators and this does nothing.

  Args:
    count: CPU devices to create; 0 leaves jax's default (one device, or the count that XLA_FLAGS'
      --xla_force_host_platform_device_count asks for, which takes precedence).
  """
  if count < 0:
    raise ConfigError(f'config.cpu_devices={count}: use 0 (jax default) or a positive count')
  if not count:
    return
  if 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    logging.info('config.cpu_devices=%d not applied: XLA_FLAGS sets the host device count', count)
    return
  if jax.config.jax_num_cpu_devices == count:
    return
  try:
    jax.config.update('jax_num_cpu_devices', count)
  except RuntimeError:  # jax refuses once its backends are up.
    logging.warning('config.cpu_devices=%d not applied: JAX started before the config was read '
                    '(this process keeps its %d CPU device(s))', count,
                    len(jax.devices('cpu')))


def set_compilation_cache(directory: Optional[str]) -> None:
  """JAX's persistent compilation cache in `directory` (config.compilation_cache_dir).

  A compiled train step takes minutes on a TPU slice, and a preempted run pays it again on every
  restart; with the cache, the restarted process loads the executable instead (keyed by the
  program, the jax version and the devices, so a changed config compiles anew). Local paths and
  gs:// work. None or '' leaves jax's setting ($JAX_COMPILATION_CACHE_DIR, else no cache).
  """
  if not directory:
    return
  jax.config.update('jax_compilation_cache_dir', str(directory))
  # Cache every compile of the run: the small ones (sampling, evaluation) add up on a restart.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  logging.info('JAX compilation cache: %s', directory)


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, mode: str = 'auto') -> None:
  """Joins the processes of a run into one JAX system (no-op for a single process).

  Args:
    coordinator_address: HOST:PORT of process 0 (explicit mode).
    num_processes: number of processes (explicit mode).
    process_id: this process's index in [0, num_processes) (explicit mode).
    mode: 'auto' (explicit flags, else TPU VM or SLURM detection, else single process), 'on'
      (always call jax.distributed.initialize, letting jax detect the cluster) or 'off'.
  """
  explicit = (coordinator_address, num_processes, process_id)
  given = [value is not None for value in explicit]
  if any(given) and not all(given):
    raise ConfigError('multi-process runs need all three of --coordinator_address=HOST:PORT, '
                      '--num_processes=N and --process_id=I (or none of them on TPU VMs and '
                      'under SLURM, where they are detected)')
  if mode not in ('auto', 'on', 'off'):
    raise ConfigError(f"unknown --distributed={mode}: use 'auto', 'on' or 'off'")
  if all(given):
    if not 0 <= process_id < num_processes:
      raise ConfigError(f'--process_id={process_id} is not in [0, --num_processes='
                        f'{num_processes}): number the processes 0 to {num_processes - 1}')
    # CPU devices of different processes talk through gloo (used by the multi-process tests).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif mode == 'on' or mode == 'auto' and (_on_tpu_vm() or _in_slurm_job_step()):
    jax.distributed.initialize()
  else:
    return
  logging.info('jax.distributed: process %d of %d, %d local and %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
