"""The benchmark CLI: runs without TensorFlow, reports positive timings and FLOPs."""

import json
import os
import subprocess
import sys

import pytest

from configs import fashion_mnist
from sagan_jax import benchmark
from sagan_jax import step_benchmark
from sagan_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Blocks TensorFlow, tfds and clu: importing any of them raises ImportError.
RUN_WITHOUT_TENSORFLOW = """
import runpy, sys
for name in ('tensorflow', 'tensorflow_datasets', 'clu'):
  sys.modules[name] = None
sys.argv = ['sagan_jax.benchmark'] + sys.argv[1:]
runpy.run_module('sagan_jax.benchmark', run_name='__main__')
"""


@pytest.fixture(scope='module')
def cli_run(tmp_path_factory):
  """The CLI on a tiny config (2 CPU devices: the demo config's cpu_devices): the D phase alone
  (the cheapest compile; the phases differ only in what create_train_step runs), 2 micro-batches,
  1 timed step."""
  json_path = str(tmp_path_factory.mktemp('benchmark') / 'bench.json')
  args = ['--config=configs/fashion_mnist.py', '--config.train.batch_size=4',
          '--config.train.grad_accum_steps=2', '--config.model.g_attention=()',
          '--config.model.d_attention=()', '--steps=1', '--warmup=0', '--peak_tflops=0.5',
          '--phases=d_step', f'--json_out={json_path}']
  env = {**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, '-c', RUN_WITHOUT_TENSORFLOW, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(json_path) as f:
    return proc.stdout, json.load(f)


def test_cli_prints_and_writes_positive_numbers(cli_run):
  stdout, results = cli_run
  # XLA_FLAGS is empty here, so the config's cpu_devices = 2 splits the CPU.
  assert results['num_devices'] == 2 and results['platform'] == 'cpu'
  assert stdout.startswith('2 x cpu (cpu), 1 process(es)')
  assert results['peak_memory_bytes'] is None and 'peak device memory: n/a' in stdout
  assert set(results['phases']) == {'d_step'}
  d_step = results['phases']['d_step']
  for field in ('step_ms', 'images_per_s', 'compile_s', 'flops_per_step',
                'tflops_per_s_per_device', 'mfu'):
    assert d_step[field] > 0, field
  row = next(line.split() for line in stdout.splitlines() if line.startswith('d_step'))
  assert all(float(x) > 0 for x in row[1:6]), row  # ms, images/s, compile s, TFLOP, TFLOP/s.
  assert row[-1].endswith('%')
  assert d_step['images_per_s'] == pytest.approx(4 / (d_step['step_ms'] / 1e3))
  assert d_step['mfu'] == pytest.approx(d_step['tflops_per_s_per_device'] / 0.5)
  # 2 micro-batches run in a scan, which XLA counts once: FLOPs come from the loop-free twin.
  assert results['flops_source'] == 'loop-free twin (lowered)'
  # At least the D convolutions: 2 images x 4 of 32x32 through conv3x3 32->32 forward alone.
  assert d_step['flops_per_step'] > 2 * 8 * 32 * 32 * 9 * 32 * 32


def test_phase_names_for_help_match_the_phases():
  assert benchmark.PHASE_NAMES == tuple(name for name, _ in step_benchmark.PHASES)


def test_known_peaks_by_device_kind():
  assert step_benchmark.known_peak_tflops('NVIDIA H200') == 989.0
  assert step_benchmark.known_peak_tflops('NVIDIA H100 80GB HBM3') == 989.0
  assert step_benchmark.known_peak_tflops('TPU v4') == 275.0
  assert step_benchmark.known_peak_tflops('TPU v5 lite') == 197.0
  assert step_benchmark.known_peak_tflops('TPU v5p') == 459.0
  assert step_benchmark.known_peak_tflops('TPU v6 lite') == 918.0
  assert step_benchmark.known_peak_tflops('cpu') is None


@pytest.mark.parametrize('kwargs,message', [
    (dict(steps=0), '--steps=0'),
    (dict(phases=('train', 'g_step')), "unknown --phases \\['train'\\]"),
])
def test_bad_flags_name_the_fix(kwargs, message):
  with pytest.raises(ConfigError, match=message):
    step_benchmark.run_benchmark(fashion_mnist.get_config(), **kwargs)


def test_input_only_times_the_training_iterator_and_resumes(tmp_path, fake_fashion_mnist_dir):
  """--input_only: the real iterator (no model): images/s and the first batch fresh and resumed."""
  json_path = str(tmp_path / 'input.json')
  args = ['--config=configs/fashion_mnist.py', f'--config.data.fashion_mnist_dir='
          f'{fake_fashion_mnist_dir}', '--config.train.batch_size=8', '--input_only',
          '--steps=3', '--warmup=1', '--resume_at=0,0.5', f'--json_out={json_path}']
  assert benchmark.main(['sagan_jax.benchmark', *args]) == 0
  with open(json_path) as f:
    results = json.load(f)
  assert results['images_per_batch'] == 8 and results['images_per_s'] > 0
  assert results['images_per_s_per_core'] * results['host_cores'] == pytest.approx(
      results['images_per_s'])
  assert set(results['first_batch_s_resumed_at']) == {'0', '0.5'}
  assert all(s > 0 for s in results['first_batch_s_resumed_at'].values())


def test_input_only_rejects_shares_outside_an_epoch():
  assert benchmark.main(['sagan_jax.benchmark', '--config=configs/fashion_mnist.py',
                         '--input_only', '--resume_at=1.5']) == 2


def test_timed_steps_keep_at_most_two_in_flight(monkeypatch):
  """Each dispatch waits for the step before the last (as the loop does), never queueing all."""
  events = []

  def compiled(state, batch):
    del batch
    events.append(('dispatch', state))
    return state + 1, {'step': state}

  monkeypatch.setattr(step_benchmark.jax, 'block_until_ready',
                      lambda x: events.append(('wait', x)) or x)
  state, seconds = step_benchmark._time_phase(compiled, 0, None, steps=5, warmup=2)
  assert state == 7 and seconds >= 0
  done = -1  # The newest step known finished.
  for kind, value in events:
    if kind == 'dispatch':
      assert value - 2 <= done, f'step {value} dispatched before step {value - 2} finished'
    elif isinstance(value, dict):
      done = max(done, value['step'])
    elif isinstance(value, int):  # The state after step value - 1.
      done = max(done, value - 1)
