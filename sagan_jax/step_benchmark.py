"""Times the compiled train step and counts its FLOPs: the measuring part of the benchmark CLI.

`run_benchmark` builds G, D, the state and the step exactly as training does and times each phase
(python -m sagan_jax.benchmark documents what it reports). Nothing here imports TensorFlow.
"""

import time
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import numpy as np

from sagan_jax import models
from sagan_jax import sharding
from sagan_jax import train
from sagan_jax import train_state
from sagan_jax.errors import ConfigError

# Dense bf16 peak TFLOP/s per chip, by a substring of jax's device_kind (first match wins).
KNOWN_PEAK_TFLOPS = (
    ('H200', 989.0), ('H100 PCIe', 756.0), ('H100', 989.0), ('TPU v4', 275.0),
    ('TPU v5 lite', 197.0), ('TPU v5e', 197.0), ('TPU v5p', 459.0), ('TPU v5', 459.0),
    ('TPU v6 lite', 918.0), ('TPU v6e', 918.0),
)
PHASES = (('train_step', ('d', 'g')), ('d_step', ('d',)), ('g_step', ('g',)))


def known_peak_tflops(device_kind: str) -> Optional[float]:
  """The dense bf16 peak of a recognized device kind, else None."""
  for name, peak in KNOWN_PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None


def synthetic_batch(config, mesh) -> Dict[str, jax.Array]:
  """A global [d_steps, B, H, W, C] batch of uniform noise images and random labels."""
  rng = np.random.default_rng(config.seed)
  local = config.train.batch_size // jax.process_count()
  res, d_steps = config.data.resolution, config.train.d_steps
  images = rng.random((d_steps, local, res, res, config.data.channels), np.float32) * 2 - 1
  labels = rng.integers(0, config.data.num_classes, (d_steps, local), np.int32)
  return sharding.make_global_batch({'image': images, 'label': labels}, mesh)


def _flops(cost: Any) -> Optional[float]:
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per program.
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return float(flops) if flops is not None and flops > 0 else None


def has_loops_or_custom_calls(config) -> bool:
  attention = config.model.g_attention or config.model.d_attention
  return (config.train.get('grad_accum_steps', 1) > 1 or
          bool(attention) and config.model.attention_impl not in ('einsum', 'fused'))


def loop_free_flops(config, phases, state, batch, mesh) -> Optional[float]:
  """Global FLOPs of the step with grad_accum_steps = 1 and einsum attention (lowered only)."""
  twin = config.copy_and_resolve_references()
  twin.train.grad_accum_steps = 1
  twin.model.attention_impl = 'einsum'
  generator, discriminator = models.create_models(twin)
  step = train.compile_train_step(
      train.create_train_step(twin, generator, discriminator, mesh, phases), mesh)
  return _flops(step.lower(state, batch).cost_analysis())


def _compiled_bytes(compiled) -> Optional[int]:
  """XLA's estimate of one device's memory for the program (arguments, outputs, temporaries)."""
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, AttributeError, RuntimeError):
    return None
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes +
             stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def peak_memory_bytes() -> Optional[Tuple[int, Optional[int]]]:
  """(peak bytes in use, bytes limit) of the busiest local device, or None where unknown."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except (NotImplementedError, RuntimeError):
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append((int(stats['peak_bytes_in_use']), stats.get('bytes_limit')))
  return max(peaks) if peaks else None


def _run(compiled, state, batch, steps: int):
  """`steps` steps, each waiting for the one before the last as the training loop does.

  Two steps in flight keep the device busy while the host dispatches. Unbounded (every step
  queued at once) is not what training does, and on the CPU backend with several devices the
  queued steps' collectives can starve one another until XLA aborts ("Termination timeout for
  all to all").
  """
  metrics = previous = None
  for _ in range(steps):
    state, metrics = compiled(state, batch)
    if previous is not None:
      jax.block_until_ready(previous)
    previous = metrics
  return state, metrics


def _time_phase(compiled, state, batch, steps: int, warmup: int):
  state, _ = _run(compiled, state, batch, warmup)
  jax.block_until_ready(state)
  start = time.perf_counter()
  state, metrics = _run(compiled, state, batch, steps)
  jax.block_until_ready((state, metrics))
  return state, (time.perf_counter() - start) / steps


def _measure_phase(config, step, step_phases, state, batch, mesh, counts, images: int,
                   peak: Optional[float], twin_flops: bool):
  """Compiles `step`, counts its FLOPs and times it; returns (state, the phase's numbers)."""
  num_devices = mesh.devices.size
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  if twin_flops:
    flops = loop_free_flops(config, step_phases, state, batch, mesh)
  else:  # The compiled program is one device's share.
    per_device = _flops(compiled.cost_analysis())
    flops = per_device * num_devices if per_device else None
  state, step_s = _time_phase(compiled, state, batch, *counts)
  tflops = flops / step_s / num_devices / 1e12 if flops else None
  return state, {
      'step_ms': step_s * 1e3, 'images_per_s': images / step_s, 'compile_s': compile_s,
      'flops_per_step': flops, 'tflops_per_s_per_device': tflops,
      'mfu': tflops / peak if tflops and peak else None,
      'compiled_bytes_per_device': _compiled_bytes(compiled)}


def run_benchmark(config, steps: int = 10, warmup: int = 2,
                  peak_tflops: Optional[float] = None,
                  phases: Sequence[str] = tuple(name for name, _ in PHASES)) -> Dict[str, Any]:
  """Compiles and times the train step phases of `config`; returns the numbers as a dict.

  Args:
    config: a training config (data, model and train sections are read).
    steps: timed steps per phase (>= 1).
    warmup: untimed steps per phase after compiling (>= 0).
    peak_tflops: one device's peak TFLOP/s for MFU; None: known_peak_tflops(device kind).
    phases: which of 'train_step', 'd_step', 'g_step' to run.
  """
  if steps < 1 or warmup < 0:
    raise ConfigError(f'--steps={steps} and --warmup={warmup}: use --steps >= 1 and --warmup >= 0')
  unknown = set(phases) - {name for name, _ in PHASES}
  if unknown or not phases:
    raise ConfigError(f'unknown --phases {sorted(unknown)}: use a comma-separated subset of '
                      'train_step,d_step,g_step')
  mesh = sharding.create_mesh()
  num_devices = mesh.devices.size
  device_kind = jax.devices()[0].device_kind
  generator, discriminator = models.create_models(config)
  sharding.check_batch_size(config.train.batch_size, mesh, config.train.get('grad_accum_steps', 1))
  batch = synthetic_batch(config, mesh)
  state = train_state.create_sharded_train_state(config, generator, discriminator,
                                                 jax.random.PRNGKey(config.seed), mesh)
  peak = peak_tflops if peak_tflops is not None else known_peak_tflops(device_kind)
  twin_flops = has_loops_or_custom_calls(config)
  images = {'train_step': config.train.batch_size * config.train.d_steps,
            'd_step': config.train.batch_size * config.train.d_steps,
            'g_step': config.train.batch_size}
  results = {}
  for name, step_phases in PHASES:
    if name in phases:
      step = train.compile_train_step(
          train.create_train_step(config, generator, discriminator, mesh, step_phases), mesh)
      state, results[name] = _measure_phase(config, step, step_phases, state, batch, mesh,
                                            (steps, warmup), images[name], peak, twin_flops)
  memory = peak_memory_bytes()
  m = config.model
  return {
      'device_kind': device_kind, 'platform': jax.default_backend(), 'num_devices': num_devices,
      'num_processes': jax.process_count(), 'peak_tflops_per_device': peak,
      'flops_source': 'loop-free twin (lowered)' if twin_flops else 'compiled step',
      'peak_memory_bytes': memory[0] if memory else None,
      'memory_limit_bytes': memory[1] if memory else None,
      'steps': steps, 'warmup': warmup,
      'config': {'resolution': config.data.resolution, 'ch': m.ch, 'dtype': m.dtype,
                 'batch_size': config.train.batch_size, 'd_steps': config.train.d_steps,
                 'grad_accum_steps': config.train.get('grad_accum_steps', 1),
                 'attention_impl': m.attention_impl, 'g_attention': list(m.g_attention),
                 'd_attention': list(m.d_attention)},
      'phases': results}


def _fmt(value: Optional[float], spec: str, scale: float = 1.0) -> str:
  if value is None:
    return format('n/a', spec.split('.')[0])
  return format(value * scale, spec)


def format_report(results: Dict[str, Any]) -> str:
  """The numbers of `run_benchmark` as a short table."""
  c = results['config']
  lines = [
      f"{results['num_devices']} x {results['device_kind']} ({results['platform']}), "
      f"{results['num_processes']} process(es)",
      f"{c['resolution']} px, ch {c['ch']}, batch {c['batch_size']}, d_steps {c['d_steps']}, "
      f"grad_accum_steps {c['grad_accum_steps']}, dtype {c['dtype']}, attention "
      f"{c['attention_impl']} at G {tuple(c['g_attention'])} D {tuple(c['d_attention'])}",
      f"{'phase':<11}{'step ms':>10}{'images/s':>11}{'compile s':>11}{'TFLOP/step':>12}"
      f"{'TFLOP/s/dev':>13}{'MFU':>8}"]
  for name, p in results['phases'].items():
    lines.append(f"{name:<11}{p['step_ms']:>10.2f}{p['images_per_s']:>11.1f}"
                 f"{p['compile_s']:>11.1f}{_fmt(p['flops_per_step'], '>12.4g', 1e-12)}"
                 f"{_fmt(p['tflops_per_s_per_device'], '>13.4g')}{_fmt(p['mfu'], '>8.1%')}")
  gib = 2.0**30
  memory = _fmt(results['peak_memory_bytes'], '.2f', 1 / gib)
  if results['memory_limit_bytes']:
    memory += f" GiB of {results['memory_limit_bytes'] / gib:.2f} GiB"
  lines.append(f'FLOPs: {results["flops_source"]}; peak device memory: {memory}')
  peak = results['peak_tflops_per_device']
  lines.append(f'peak: {peak} TFLOP/s per device' if peak else
               'peak: n/a (unknown device kind: pass --peak_tflops for MFU)')
  return '\n'.join(lines)
