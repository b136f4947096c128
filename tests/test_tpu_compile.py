"""Compiling the train step for TPU slices on this CPU machine (libtpu's compile-only client).

The compiles run in a subprocess that sees libtpu (`make test` installs it into .venv/libtpu, off
the venv's path, and names the folder in $SAGAN_LIBTPU_DIR): the tiny test config for a 1-host
slice, which fits, and for a 4-host slice at a batch that cannot fit a v5e chip's 16 GiB.
"""

import json
import logging
import os
import subprocess
import sys

import pytest

from sagan_jax import tpu_compile
from tests.test_main import REPO

LIBTPU_DIR = os.environ.get('SAGAN_LIBTPU_DIR', os.path.join(REPO, '.venv', 'libtpu'))
# Blockwise attention puts a loop in the step: the FLOPs come from its loop-free twin.
TINY = ['--config=fashion_mnist', '--config.model.ch=8', '--config.train.batch_size=8',
        '--config.model.attention_impl=blockwise']
# 16 devices x 262144 images of 32x32: far beyond a v5e chip's 16 GiB (XLA refuses at once).
TOO_BIG = ['--config=fashion_mnist', '--config.model.ch=8', '--config.train.batch_size=4194304']


def _compile(tmp_path, topology, config_flags):
  assert os.path.isdir(os.path.join(LIBTPU_DIR, 'libtpu')), (
      f'libtpu is not in {LIBTPU_DIR}: run `make test` (it installs '
      'requirements-tpu-compile.txt there)')
  out = tmp_path / f'{topology}.json'
  env = {**{k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}, 'PYTHONPATH': LIBTPU_DIR}
  result = subprocess.run(
      [sys.executable, '-m', 'sagan_jax.benchmark', *config_flags, f'--topology={topology}',
       f'--json_out={out}'], cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out) as f:
    return result, json.load(f)


@pytest.fixture(scope='module')
def reports(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp('tpu_compile')
  return {'one_host': _compile(tmp_path, 'v5e-4', TINY),
          'four_hosts': _compile(tmp_path, 'v5e-16', TOO_BIG)}


def test_one_host_slice_report_has_every_field_and_fits(reports):
  result, report = reports['one_host']
  assert report['topology'] == 'v5e-4' and report['hosts'] == 1 and report['devices'] == 4
  assert report['device_kind'].startswith('TPU v5')
  b = report['bytes_per_device']
  for field in ('argument', 'output', 'temp', 'generated_code'):
    assert b[field] > 0, field
  assert b['total'] == b['argument'] + b['output'] - b['alias'] + b['temp'] + b['generated_code']
  # The donated state: its outputs alias its inputs.
  assert b['alias'] > 0 and b['alias'] <= min(b['argument'], b['output'])
  assert report['hbm_bytes_per_device'] == 16 * 2**30 and report['fits']
  assert report['flops_source'] == 'loop-free twin (lowered)'
  # At least D's 3x3 convolutions on 2 x 8 images of 32 x 32 x 32 channels, forward alone.
  assert report['flops_per_step'] > 2 * 16 * 32 * 32 * 9 * 32 * 32 and report['compile_s'] > 0
  assert report['estimated_step_seconds'] is None or report['estimated_step_seconds'] > 0
  lines = result.stdout.splitlines()
  assert lines[0].startswith('v5e-4 (v5e:2x2): 4 x TPU v5') and 'fits' in lines[2]
  assert 'Traceback' not in result.stderr and 'E0000' not in result.stderr


def test_multi_host_slice_compiles_and_reports_a_batch_that_cannot_fit(reports):
  result, report = reports['four_hosts']
  assert report['hosts'] == 4 and report['devices'] == 16 and report['batch_size'] == 4194304
  assert not report['fits'] and 'RESOURCE_EXHAUSTED' in report['compile_error']
  assert report['bytes_per_device']['total'] > report['hbm_bytes_per_device']
  assert 'DOES NOT FIT' in result.stdout and 'Traceback' not in result.stderr


def test_out_of_memory_message_gives_the_bytes_needed():
  fields = tpu_compile._out_of_memory(
      'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
      'temporaries (309.16G) exceeds available HBM (15.75G).', 16 * 2**30)
  b = fields['bytes_per_device']
  assert b['temp'] == int(309.16 * 2**30) and not fields['fits']
  # The footprint is the temporaries plus what is placed before them (16 - 15.75 GiB).
  assert b['total'] == int(309.16 * 2**30) + int(0.25 * 2**30)
  # Temporaries below the HBM that still do not fit beside the state: the total says so.
  fields = tpu_compile._out_of_memory(
      'RESOURCE_EXHAUSTED: the total memory required for HLO temporaries (15.25G) exceeds '
      'available HBM (14.50G).', 16 * 2**30)
  assert fields['bytes_per_device']['total'] == int(16.75 * 2**30)
  # Temporaries without the HBM left for them: no total rather than one that leaves out the state.
  fields = tpu_compile._out_of_memory(
      'RESOURCE_EXHAUSTED: the total memory required for HLO temporaries (15.25G).', 16 * 2**30)
  b = fields['bytes_per_device']
  assert b['temp'] == int(15.25 * 2**30) and b['total'] is None and not fields['fits']
  # A refusal without the figures: no total rather than a wrong one.
  fields = tpu_compile._out_of_memory('RESOURCE_EXHAUSTED: Ran out of memory.', 16 * 2**30)
  assert fields['bytes_per_device']['total'] is None and not fields['fits']


def _fake_compiles(monkeypatch, needed_gib, reports_bytes=True):
  """compile_for_slice replaced by a memory model: GiB needed per device at a global batch."""
  calls = []

  def fake_compile(config, name, devices):
    batch = config.train.batch_size
    calls.append(batch)
    total = int(needed_gib(batch) * 2**30)
    fits = total <= 16 * 2**30
    fixed = 2**31 if fits else None  # The state: 2 GiB of arguments.
    return {'batch_size': batch, 'fits': fits, 'hbm_bytes_per_device': 16 * 2**30,
            'compile_s': 60.0,
            'bytes_per_device': {'argument': fixed, 'output': 0 if fits else None,
                                 'alias': 0 if fits else None,
                                 'generated_code': 0 if fits else None,
                                 'total': total if fits or reports_bytes else None}}

  monkeypatch.setattr(tpu_compile, 'compile_for_slice', fake_compile)
  return calls


@pytest.mark.parametrize('needed_gib,reports_bytes,expected', [
    (lambda b: 2 + 0.3 * b, True, [16, 48, 44]),  # Linear: one fit, one miss, one fit.
    # Slower than linear, as XLA:TPU's temporaries are: the line's guess (72) fits, so the next
    # probe doubles (144, a miss) instead of creeping up along the line one fit at a time.
    (lambda b: 1.3 + 0.55 * b**0.7, True, [16, 72, 144, 112, 108]),
    (lambda b: 2 + 0.3 * b, False, None),  # Misses that report no bytes: bisection.
    (lambda b: 2 + 0.006 * b * b, True, None),  # Not linear: more probes, same answer.
    (lambda b: 20 + b, True, None),  # Nothing fits.
])
def test_max_batch_is_proven_by_a_fit_and_the_miss_one_multiple_above(
    monkeypatch, caplog, needed_gib, reports_bytes, expected):
  """The search over multiples of the device count (4) with a memory model instead of compiles."""
  calls = _fake_compiles(monkeypatch, needed_gib, reports_bytes)
  from configs import fashion_mnist  # pylint: disable=g-import-not-at-top
  config = fashion_mnist.get_config()  # Global batch 16: the first probe.
  with caplog.at_level(logging.INFO):
    result = tpu_compile.max_batch(config, 'v5e-4', devices=[object()] * 4)
  best = max([b for b in range(4, 4096, 4) if needed_gib(b) <= 16], default=0)
  assert result['max_batch'] == best and calls[0] == 16
  assert result['probes'].get(best, True) and not result['probes'][best + 4]
  assert len(calls) == len(set(calls)) <= 12
  if expected:
    assert calls == expected
  if best:
    assert result['batch_size'] == best
  # A line per probe as it ends: the batch, its fit, and what is proven so far.
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('--max_batch:')]
  assert len(lines) == len(calls)
  assert lines[0].startswith(f'--max_batch: global batch {calls[0]} needs ')
  assert lines[-1].endswith(f"largest fit so far {best or 'none'}, smallest miss {best + 4}")


def test_an_interrupted_search_resumes_from_its_journal_and_compiles_only_the_rest(
    monkeypatch, caplog, tmp_path):
  needed_gib = lambda b: 1.3 + 0.55 * b**0.7  # Five probes: 16, 72, 144, 112, 108.
  calls = _fake_compiles(monkeypatch, needed_gib)
  from configs import fashion_mnist  # pylint: disable=g-import-not-at-top
  config, devices, journal = fashion_mnist.get_config(), [object()] * 4, str(tmp_path / 'j')
  uninterrupted = tpu_compile.max_batch(config, 'v5e-4', devices=devices)
  path, calls[:] = list(calls), []
  compile_probe = tpu_compile.compile_for_slice

  def killed_after_two(*args):
    if len(calls) == 2:
      raise KeyboardInterrupt  # Ctrl-C, or a kill, during the third compile.
    return compile_probe(*args)

  monkeypatch.setattr(tpu_compile, 'compile_for_slice', killed_after_two)
  with pytest.raises(KeyboardInterrupt):
    tpu_compile.max_batch(config, 'v5e-4', devices=devices, journal=journal)
  with open(journal, 'a') as f:
    f.write('{"key": "a line cut off')  # As a kill during a write would leave it.
  monkeypatch.setattr(tpu_compile, 'compile_for_slice', compile_probe)
  calls[:] = []
  caplog.clear()  # The lines of the runs above, where an earlier test left absl at INFO.
  with caplog.at_level(logging.INFO):
    resumed = tpu_compile.max_batch(config, 'v5e-4', devices=devices, journal=journal)
  assert calls == path[2:] and resumed == uninterrupted
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('--max_batch:')]
  assert ['from the journal' in line for line in lines] == [True, True, False, False, False]
  # Every probe is in the journal now: a third start compiles nothing.
  calls[:] = []
  assert tpu_compile.max_batch(config, 'v5e-4', devices=devices, journal=journal) == resumed
  assert not calls
  # A journal written before a field existed (here: without train.lr_decay_end_factor) still
  # serves a config that leaves the field at its default, not one that sets it.
  entries = [json.loads(line) for line in open(journal) if line.endswith('}\n')]
  assert len(entries) == 5
  for entry in entries:
    del entry['search']['config']['train']['lr_decay_end_factor']
  with open(journal, 'w') as f:
    f.writelines(json.dumps(entry) + '\n' for entry in entries)
  assert tpu_compile.max_batch(config, 'v5e-4', devices=devices, journal=journal) == resumed
  assert not calls
  with config.unlocked():
    config.train.lr_decay_end_factor = 0.5
  tpu_compile.max_batch(config, 'v5e-4', devices=devices, journal=journal)
  assert calls == path
  # Another config (or slice, jax, libtpu) reuses none of them.
  calls[:] = []
  with config.unlocked():
    config.train.lr_decay_end_factor = 0.0
    config.model.ch = 16
  tpu_compile.max_batch(config, 'v5e-4', devices=devices, journal=journal)
  assert calls == path


def test_every_slice_name_resolves_and_v5litepod_names_are_v5e():
  assert tpu_compile.SLICES['v5litepod-8'] == tpu_compile.SLICES['v5e-8']
  assert tpu_compile.get_slice('v4-32').hosts == 4
  for name in ('v4-8', 'v5e-8', 'v5p-8', 'v6e-8'):
    assert tpu_compile.get_slice(name).hosts == 1
