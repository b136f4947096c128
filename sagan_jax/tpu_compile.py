"""Compiles the train step for a TPU slice on any machine: per-chip memory, fit, FLOPs.

libtpu carries a compile-only client: with JAX on the CPU platform,
`jax.experimental.topologies.get_topology_desc` gives the devices of a slice that is not there,
and `jax.jit(...).lower(...).compile()` over a mesh of them compiles the real SPMD program that
every host of the slice would run. `python -m sagan_jax.benchmark --topology=v5e-8` reports it
(`compile_for_slice`); `--max_batch` searches the largest global batch that fits (`max_batch`).

The step is the one `main` trains with: `train.create_train_step` under `train.compile_train_step`
over a one-axis mesh of every device of the slice, with abstract state and batch (nothing is
allocated). XLA:TPU's `memory_analysis()` gives the bytes of one device's program, its
`cost_analysis()` the FLOPs of one device's share and a cost-model time that is an estimate, not a
measurement.
"""

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import re
import time
from typing import Any, Dict, Optional, Tuple

from absl import logging

from sagan_jax import cli
from sagan_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice as users name it, and how the compile-only client builds it."""
  topology: str  # jax's topology name: 'v5e:2x4'.
  hosts: int
  chips_per_host: Tuple[int, int, int]
  hbm_gib_per_chip: float
  cores_per_chip: int = 1  # Devices per chip in the compile-only client (v4: one per TensorCore).


# The chips' HBM: v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e (Trillium) 32 GiB.
_HBM = {'v4': 32.0, 'v5e': 16.0, 'v5p': 95.0, 'v6e': 32.0}
# Names as `gcloud compute tpus tpu-vm create --accelerator-type` takes them (v4 and v5p count
# TensorCores, v5e and v6e chips), with `v5e-N` for v5litepod-N.
SLICES = {
    'v4-8': Slice('v4:2x2x1', 1, (2, 2, 1), _HBM['v4'], 2),
    'v4-16': Slice('v4:2x2x2', 2, (2, 2, 1), _HBM['v4'], 2),
    'v4-32': Slice('v4:2x2x4', 4, (2, 2, 1), _HBM['v4'], 2),
    'v4-64': Slice('v4:2x4x4', 8, (2, 2, 1), _HBM['v4'], 2),
    'v5e-1': Slice('v5e:1x1', 1, (1, 1, 1), _HBM['v5e']),
    'v5e-4': Slice('v5e:2x2', 1, (2, 2, 1), _HBM['v5e']),
    'v5e-8': Slice('v5e:2x4', 1, (2, 4, 1), _HBM['v5e']),
    'v5e-16': Slice('v5e:4x4', 4, (2, 2, 1), _HBM['v5e']),
    'v5e-32': Slice('v5e:4x8', 8, (2, 2, 1), _HBM['v5e']),
    'v5e-64': Slice('v5e:8x8', 16, (2, 2, 1), _HBM['v5e']),
    'v5p-8': Slice('v5p:2x2x1', 1, (2, 2, 1), _HBM['v5p']),
    'v5p-16': Slice('v5p:2x2x2', 2, (2, 2, 1), _HBM['v5p']),
    'v5p-32': Slice('v5p:2x2x4', 4, (2, 2, 1), _HBM['v5p']),
    'v6e-1': Slice('v6e:1x1', 1, (1, 1, 1), _HBM['v6e']),
    'v6e-4': Slice('v6e:2x2', 1, (2, 2, 1), _HBM['v6e']),
    'v6e-8': Slice('v6e:2x4', 1, (2, 4, 1), _HBM['v6e']),
    'v6e-16': Slice('v6e:4x4', 4, (2, 2, 1), _HBM['v6e']),
    'v6e-32': Slice('v6e:4x8', 8, (2, 2, 1), _HBM['v6e']),
}
SLICES.update({name.replace('v5e-', 'v5litepod-'): s for name, s in list(SLICES.items())
               if name.startswith('v5e-')})
INSTALL_HINT = ("pip install 'libtpu==0.0.42.*' (the libtpu of jax 0.10.2; or "
                "pip install '.[tpu]')")


def get_slice(name: str) -> Slice:
  if name not in SLICES:
    raise ConfigError(f'unknown --topology={name}: use one of {", ".join(sorted(SLICES))}')
  return SLICES[name]


def check_libtpu() -> None:
  """ConfigError, with the install command, unless libtpu can be imported."""
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ConfigError(f'--topology needs libtpu, which is not installed: {INSTALL_HINT}') from e


def slice_devices(name: str):
  """The devices of slice `name` from libtpu's compile-only client (JAX stays on the CPU)."""
  spec = get_slice(name)
  check_libtpu()
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')  # No metadata server: this is no TPU VM.
  # Compiling needs no exclusive TPU: several compiles (or a test beside one) may run at once.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if jax.default_backend() == 'tpu':
    raise ConfigError('--topology compiles for a slice from a machine without one; on a TPU VM '
                      'run the benchmark without --topology')
  with cli.quiet_stderr():  # libtpu's start-up looks for a TPU VM and says it found none.
    return topologies.get_topology_desc(platform='tpu', topology_name=spec.topology,
                                        chips_per_host_bounds=spec.chips_per_host).devices


def _abstract_inputs(config, mesh, generator, discriminator):
  """Shapes, dtypes and shardings of the state and a batch, as the train step receives them."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sagan_jax import sharding  # pylint: disable=g-import-not-at-top
  from sagan_jax import train_state  # pylint: disable=g-import-not-at-top
  replicated = sharding.replicated(mesh)
  state = jax.eval_shape(lambda rng: train_state.create_train_state(
      config, generator, discriminator, rng), jax.random.PRNGKey(0))
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                       state)
  batch_sharding = sharding.step_batch_sharding(mesh)
  res, d_steps, size = config.data.resolution, config.train.d_steps, config.train.batch_size
  batch = {'image': jax.ShapeDtypeStruct((d_steps, size, res, res, config.data.channels),
                                         np.float32, sharding=batch_sharding),
           'label': jax.ShapeDtypeStruct((d_steps, size), np.int32, sharding=batch_sharding)}
  return state, batch


def compile_for_slice(config, name: str, devices=None) -> Dict[str, Any]:
  """Compiles `config`'s train step for slice `name`; returns the per-device report.

  Memory fields are one device's program (every device runs the same one): arguments, outputs,
  temporaries, generated code; `total_bytes` = arguments + outputs - aliased (the donated state)
  + temporaries + code, against `hbm_bytes`, the device's share of its chip's HBM.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sagan_jax import step_benchmark  # pylint: disable=g-import-not-at-top
  from sagan_jax import models  # pylint: disable=g-import-not-at-top
  from sagan_jax import sharding  # pylint: disable=g-import-not-at-top
  from sagan_jax import train  # pylint: disable=g-import-not-at-top
  spec = get_slice(name)
  devices = slice_devices(name) if devices is None else devices
  mesh = Mesh(np.asarray(devices), (sharding.DATA_AXIS,))
  sharding.check_batch_size(config.train.batch_size, mesh, config.train.grad_accum_steps)
  generator, discriminator = models.create_models(config)
  state, batch = _abstract_inputs(config, mesh, generator, discriminator)
  start = time.perf_counter()
  step = train.compile_train_step(train.create_train_step(config, generator, discriminator,
                                                          mesh), mesh)
  report = {'topology': name, 'jax_topology': spec.topology, 'hosts': spec.hosts,
            'devices': len(devices), 'device_kind': devices[0].device_kind,
            'devices_per_chip': spec.cores_per_chip, 'batch_size': config.train.batch_size,
            'hbm_bytes_per_device': int(spec.hbm_gib_per_chip * 2**30 / spec.cores_per_chip)}
  try:
    compiled = step.lower(state, batch).compile()
  except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses a program that cannot fit.
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    return {**report, **_out_of_memory(str(e), report['hbm_bytes_per_device']),
            'compile_s': time.perf_counter() - start}
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  fields = {f: int(getattr(memory, f'{f}_size_in_bytes'))
            for f in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  total = (fields['argument'] + fields['output'] - fields['alias'] + fields['temp'] +
           fields['generated_code'])
  cost = compiled.cost_analysis()
  cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
  flops = float(cost.get('flops', 0.0)) * len(devices) or None
  flops_source = 'compiled step'
  if step_benchmark.has_loops_or_custom_calls(config):  # XLA counts a loop body once.
    # The loop-free twin's HLO cost does not depend on the platform; TPU lowerings give none.
    cpu_mesh = Mesh(np.asarray(jax.devices('cpu')[:1]), (sharding.DATA_AXIS,))
    flops = step_benchmark.loop_free_flops(
        config, ('d', 'g'), *_abstract_inputs(config, cpu_mesh, generator, discriminator),
        cpu_mesh)
    flops_source = 'loop-free twin (lowered)'
  estimate = float(cost.get('optimal_seconds', 0.0))
  return {**report, 'bytes_per_device': {**fields, 'total': total},
          'fits': total <= report['hbm_bytes_per_device'], 'compile_error': None,
          'flops_per_step': flops, 'flops_source': flops_source,
          # XLA's cost model; reported only when positive (it can come out negative).
          'estimated_step_seconds': estimate if estimate > 0 else None, 'compile_s': compile_s}


_UNITS = {'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def _out_of_memory(message: str, hbm_bytes: int) -> Dict[str, Any]:
  """The report fields of a compile that XLA refused for lack of HBM.

  XLA:TPU's quick refusal names the HLO temporaries' bytes and the HBM left for them once the
  arguments, outputs and code are placed ("the total memory required for HLO temporaries (X)
  exceeds available HBM (Y)"): the footprint is X plus what is already placed (the device's HBM
  less Y), not X alone, which can be below the HBM. A refusal without both figures (one that
  comes after a full compile) gives no total.
  """
  line = next((x for x in message.splitlines() if 'RESOURCE_EXHAUSTED' in x), message)
  to_bytes = lambda m: int(float(m.group(1)) * _UNITS[m.group(2)])
  needed = re.search(r'required[^(]*\(([\d.]+)([KMGT])\)', line)
  available = re.search(r'available[^(]*\(([\d.]+)([KMGT])\)', line)
  temp = to_bytes(needed) if needed else None
  total = temp + max(hbm_bytes - to_bytes(available), 0) if needed and available else None
  return {'bytes_per_device': {'argument': None, 'output': None, 'alias': None, 'temp': temp,
                               'generated_code': None, 'total': total},
          'fits': False, 'compile_error': line.strip()[:300], 'flops_per_step': None,
          'flops_source': None, 'estimated_step_seconds': None}


def max_batch(config, name: str, devices=None, limit: int = 1 << 16,
              journal: Optional[str] = None) -> Dict[str, Any]:
  """The largest global batch (a multiple of the device count) whose step fits the slice.

  A compile that fits takes minutes, one that XLA refuses takes seconds and still reports the
  bytes it needed, so the search is led by memory rather than by halving: per-device bytes grow
  nearly linearly with the batch (state and code fixed, temporaries per image). The first probe
  is the config's batch; the next is one multiple past the batch where the line through what is
  known reaches the HBM (a miss expected: cheap), or twice the largest fit when the line's last
  guess fit (temporaries grow slower than the batch), then the batch below it (a fit expected).
  Each probe lies strictly between the largest fit and the smallest miss, so the search ends with
  both proven: `max_batch` fits and `max_batch` + one multiple does not. Returns the report of
  the largest fit with `max_batch` and the probes ({batch: fits}); `max_batch` is 0 when one
  batch per device does not fit.

  A search takes hours on a few cores. With `journal` (a file path) each probe's report is
  appended to it as the probe ends, and a search of the same config (fields added since, at their
  defaults, count as the same), slice, jax and libtpu started again reuses the probes found
  there: it takes the same path and compiles only what the interrupted one had not.
  """
  devices = slice_devices(name) if devices is None else devices
  unit = len(devices) * config.train.grad_accum_steps
  top = max(1, limit // unit)
  probes: Dict[int, bool] = {}
  reports: Dict[int, Dict[str, Any]] = {}
  good, bad = 0, None
  multiple = min(top, max(1, config.train.batch_size // unit))
  search = _search_identity(config, name) if journal else None
  done = _read_journal(journal, search) if journal else {}
  while True:
    probe = config.copy_and_resolve_references()
    with probe.unlocked():
      probe.train.batch_size = multiple * unit
    reused = multiple * unit in done
    if reused:
      reports[multiple] = done[multiple * unit]
    else:
      reports[multiple] = compile_for_slice(probe, name, devices)
      if journal:
        _append_journal(journal, search, reports[multiple])
    probes[multiple * unit] = reports[multiple]['fits']
    good, bad = (multiple, bad) if probes[multiple * unit] else (good, multiple)
    logging.info('%s', _probe_line(reports[multiple], good * unit, bad and bad * unit, reused))
    multiple = _next_probe(reports, good, bad, top)
    if multiple is None:
      break
  result = dict(reports[good] if good else reports[min(reports)])
  result.update(max_batch=good * unit, probes=probes)
  return result


def _search_identity(config, name: str) -> Dict[str, Any]:
  """What a probe's bytes depend on besides the batch: the config, the slice, jax, libtpu."""
  import jax  # pylint: disable=g-import-not-at-top
  probe = config.copy_and_resolve_references()
  with probe.unlocked():
    probe.train.batch_size = 0
  try:
    libtpu = importlib.metadata.version('libtpu')
  except importlib.metadata.PackageNotFoundError:
    libtpu = None
  return json.loads(json.dumps({'slice': name, 'config': json.loads(probe.to_json_best_effort()),
                                'jax': jax.__version__, 'libtpu': libtpu}))


def _flatten(tree: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f'{prefix}{k}.') if isinstance(v, dict) else {f'{prefix}{k}': v})
  return out


def _default_fields() -> Dict[str, Any]:
  """configs/default.py's fields, flattened: what a field added to the code since stands for."""
  spec = importlib.util.spec_from_file_location(
      '_sagan_default_config', os.path.join(cli.CONFIGS_DIR, 'default.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return _flatten(json.loads(module.get_config().to_json_best_effort()))


def _same_search(saved: Any, current: Dict[str, Any], defaults: Dict[str, Any]) -> bool:
  """Whether a journal's probe holds for the current search. A field that the saved config
  lacks (added to the code since) matches when the current config leaves it at its default."""
  if not isinstance(saved, dict) or any(saved.get(k) != current[k]
                                        for k in ('slice', 'jax', 'libtpu')):
    return False
  old, new = _flatten(saved.get('config') or {}), _flatten(current['config'])
  missing = object()
  return set(old) <= set(new) and all(
      old[f] == v if f in old else defaults.get(f, missing) == v for f, v in new.items())


def _read_journal(path: str, search: Dict[str, Any]) -> Dict[int, Dict[str, Any]]:
  """The reports of `path` written by the same search, by global batch."""
  reports, defaults = {}, None
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          entry = json.loads(line)
        except json.JSONDecodeError:  # The line a killed search was writing.
          continue
        if not isinstance(entry, dict) or 'report' not in entry:
          continue
        if entry.get('search') != search:
          defaults = _default_fields() if defaults is None else defaults
          if not _same_search(entry.get('search'), search, defaults):
            continue
        reports[entry['report']['batch_size']] = entry['report']
  return reports


def _append_journal(path: str, search: Dict[str, Any], report: Dict[str, Any]) -> None:
  """One report as one line, on disk before the search goes on."""
  torn = False
  if os.path.exists(path) and os.path.getsize(path):
    with open(path, 'rb') as f:
      f.seek(-1, os.SEEK_END)
      torn = f.read(1) != b'\n'  # A line cut off by a kill: end it, so that this one parses.
  with open(path, 'a') as f:
    f.write(('\n' if torn else '') + json.dumps({'search': search, 'report': report}) + '\n')
    f.flush()
    os.fsync(f.fileno())


def _probe_line(report: Dict[str, Any], fits: int, misses: Optional[int],
                reused: bool = False) -> str:
  """One probe of the search, and what is proven so far (a search can take an hour)."""
  total = report['bytes_per_device']['total']
  needed = f'{total / 2**30:.2f} GiB of' if total else 'more than'
  how = 'from the journal, compiled earlier in' if reused else 'compiled in'
  return (f"--max_batch: global batch {report['batch_size']} needs {needed} the device's "
          f"{report['hbm_bytes_per_device'] / 2**30:.2f} GiB: "
          f"{'fits' if report['fits'] else 'does not fit'} ({how} "
          f"{report['compile_s']:.0f} s); largest fit so far {fits or 'none'}, smallest miss "
          f"{misses or 'none yet'}")


def _next_probe(reports, good: int, bad: Optional[int], top: int) -> Optional[int]:
  """The next multiple to compile, strictly between `good` and `bad`; None when there is none."""
  high = top if bad is None else bad - 1
  if good >= high:
    return None
  total = lambda m: reports[m]['bytes_per_device']['total']
  hbm = reports[good or bad]['hbm_bytes_per_device']
  if good and bad is None:  # Fixed bytes (state, code) from the fit; the rest grows per image.
    b = reports[good]['bytes_per_device']
    fixed = b['argument'] + b['output'] - b['alias'] + b['generated_code']
    per_multiple = max(total(good) - fixed, 1) / good
    # XLA:TPU's temporaries grow slower than the batch (ImageNet-128 on a v5e-8: 0.13 GiB per
    # image per chip at 32, 0.07 at 200), so the line through a fit falls short. After a fit that
    # the line had placed past the HBM (every probe after the first; with no miss yet each one
    # fit), double the batch: a miss comes within few probes.
    beyond = len(reports) > 1
    return min(high, max(good + 1, int((hbm - fixed) / per_multiple) + 1,
                         2 * good if beyond else 0))
  if not good:  # Only misses: bytes as if all of them grew with the batch (low, so a fit).
    return max(1, min(high, int(bad * hbm / total(bad)))) if total(bad) else max(1, bad // 2)
  if not total(bad) or total(bad) <= total(good):
    return (good + bad) // 2
  crossing = good + (hbm - total(good)) * (bad - good) / (total(bad) - total(good))
  return min(high, max(good + 1, int(crossing) + (1 if int(crossing) + 1 < bad else 0)))


def format_report(report: Dict[str, Any]) -> str:
  """The compile report as a few lines."""
  gib = 2.0**30
  b = report['bytes_per_device']
  per = 'TensorCore' if report['devices_per_chip'] > 1 else 'chip'
  hbm = report['hbm_bytes_per_device'] / gib
  lines = [
      f"{report['topology']} ({report['jax_topology']}): {report['devices']} x "
      f"{report['device_kind']} on {report['hosts']} host(s), global batch "
      f"{report['batch_size']}; compiled in {report['compile_s']:.1f} s"]
  if report.get('compile_error'):
    needed = f"{b['total'] / gib:.2f} GiB" if b['total'] else 'more'
    lines.append(f'per {per}: needs {needed} of {hbm:.2f} GiB HBM: DOES NOT FIT (XLA refused '
                 f"to compile: {report['compile_error']})")
  else:
    lines += [
        f"per {per}: arguments {b['argument'] / gib:.2f} GiB, outputs {b['output'] / gib:.2f} "
        f"GiB (aliased {b['alias'] / gib:.2f}), temporaries {b['temp'] / gib:.2f} GiB, code "
        f"{b['generated_code'] / gib:.3f} GiB",
        f"total {b['total'] / gib:.2f} GiB of {hbm:.2f} GiB HBM: "
        + ('fits' if report['fits'] else 'DOES NOT FIT')]
    flops = report['flops_per_step']
    lines.append(f'XLA FLOPs per step: {flops / 1e12:.3f} TFLOP, '
                 f'{flops / report["batch_size"] / 1e9:.1f} GFLOP per image '
                 f"({report['flops_source']})" if flops else 'XLA FLOPs per step: n/a')
    seconds = report['estimated_step_seconds']
    lines.append(f'XLA cost-model step time: {seconds * 1e3:.1f} ms (an estimate, not a '
                 'measurement)' if seconds else 'XLA cost-model step time: n/a')
  if 'max_batch' in report:
    lines.append(f"largest global batch that fits: {report['max_batch']} (probed: " + ', '.join(
        f"{k} {'fits' if v else 'no'}" for k, v in sorted(report['probes'].items())) + ')')
  return '\n'.join(lines)
