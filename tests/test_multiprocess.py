"""Two processes on localhost (4 CPU devices each, jax.distributed over gloo) train like one.

They also stop together: SIGTERM to one process makes both save at one step (JAX's preemption
sync point) and exit 0.

Both processes run `python -m sagan_jax.main` with explicit --coordinator_address flags; the
reference is one process with 8 devices. The data set holds one image, so every global batch is the
same whichever process reads which example, and the fake latents and labels depend only on the
step. The two runs then compute the same first step from the same initial state, and the test
compares every array of the state after it.

Tolerance, derived from what differs. The runs add the same float32 terms in different orders:
the cross-process all-reduce (gloo) sums per-process partial sums, one process sums per-device
ones, and XLA's CPU kernels group terms by the CPU's vector width. In D's step, taken at identical
parameters and inputs, that is rounding alone: of order eps32 * sqrt(terms) of a gradient's
absolute terms (measured: 1e-6 of each array's norm). G's step follows D's update, and Adam turns
rounding in gradients near adam_eps into parameter differences of up to one update per element;
G's gradients then differ by up to 7e-3 of their norm (measured on an AVX-512 EPYC; less
elsewhere). A bug in what the processes compute (a wrong or repeated share of the batch, other
latents, a sum instead of a mean over processes) changes gradients, and so Adam's moments and the
updates, by a fraction of order one (a factor 2 for a sum). The bound, 5% of each array's norm,
sits 7 times above the worst rounding seen and 20 times below such a bug. Arrays whose exact value
is zero (biases that feed a batch norm, and their moments) hold rounding noise only: they are
measured against the same 5% of 1% of their collection's root-mean-square element. Adam's epsilon
is raised to 1e-4 so that those noise gradients do not become full-size steps of random sign.
"""

import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sagan_jax import checkpointing
from tests.conftest import write_idx
from tests.test_main import REPO
from tests.test_main import tiny_flags


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def start(flags, devices, extra=(), log_path=None):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  out = open(log_path, 'w') if log_path else subprocess.PIPE  # pylint: disable=consider-using-with
  return subprocess.Popen([sys.executable, '-m', 'sagan_jax.main', *flags, *extra], cwd=REPO,
                          env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def state_at(workdir, step):
  manager = checkpointing.open_for_reading(os.path.join(workdir, 'checkpoints'))
  # Onto this process's devices: the saved shardings name devices of two processes.
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(checkpointing.local_target(manager, step, 'state')),
      data=ocp.args.JsonRestore()))
  return restored['state'], restored['data']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp('multiprocess')
  data_dir = str(base / 'data')
  os.makedirs(data_dir)
  image = np.random.default_rng(0).integers(0, 256, (1, 28, 28), dtype=np.uint8)
  for prefix, n in (('train', 64), ('t10k', 16)):
    write_idx(os.path.join(data_dir, f'{prefix}-images-idx3-ubyte.gz'), np.repeat(image, n, 0))
    write_idx(os.path.join(data_dir, f'{prefix}-labels-idx1-ubyte.gz'), np.full(n, 3, np.uint8))

  def flags(workdir, num_steps):
    # adam_eps 1e-4: biases that feed a batch norm get gradients of pure rounding noise, which
    # Adam with eps 1e-8 would blow up to full-size steps of random sign.
    return tiny_flags(data_dir, str(base / workdir), num_steps) + [
        '--config.sample.final_per_class=0', '--config.train.adam_eps=1e-4']

  single = start(flags('single', 1) + ['--config.checkpoint_every_steps=1'], 8)
  single_log = single.communicate(timeout=600)[0]
  # The two processes would train for 1000 steps; process 1 gets SIGTERM once process 0 has
  # logged step 5, and both must save at one common step and exit 0. Every step is saved and
  # kept: step 1 is compared with the single process.
  distributed = [f'--coordinator_address=localhost:{free_port()}', '--num_processes=2']
  multi = flags('multi', 1000) + ['--config.checkpoint_every_steps=1',
                                  '--config.keep_checkpoints=1000']
  log_1 = str(base / 'process_1.log')
  process_1 = start(multi, 4, distributed + ['--process_id=1'], log_path=log_1)
  process_0 = start(multi, 4, distributed + ['--process_id=0'])
  lines = []
  for line in process_0.stdout:
    lines.append(line)
    if 'step 5/1000' in line:
      process_1.send_signal(signal.SIGTERM)
      break
  lines.append(process_0.communicate(timeout=600)[0])
  process_1.wait(timeout=600)
  with open(log_1) as f:
    multi_logs = [''.join(lines), f.read()]
  return dict(base=str(base), single=(single.returncode, single_log),
              multi=[(p.returncode, log) for p, log in zip((process_0, process_1), multi_logs)])


def test_two_processes_run_save_together_on_sigterm_and_only_process_0_writes_files(runs):
  code, log = runs['single']
  assert code == 0, log[-3000:]
  saved_at = []
  for i, (code, log) in enumerate(runs['multi']):
    assert code == 0, f'process {i}:\n{log[-3000:]}'
    assert 'Starting at step 0 of 1000 (8 devices, 2 processes)' in log
    saved = [line for line in log.splitlines() if 'SIGTERM: saved a checkpoint at step' in line]
    assert saved, f'process {i}:\n{log[-3000:]}'
    saved_at.append(int(saved[0].split('at step ')[1].split(';')[0]))
  assert saved_at[0] == saved_at[1] >= 5
  workdir = os.path.join(runs['base'], 'multi')
  assert str(saved_at[0]) in os.listdir(os.path.join(workdir, 'checkpoints'))
  assert len([f for f in os.listdir(workdir) if 'tfevents' in f]) == 1
  assert 'step_0000002.png' in os.listdir(os.path.join(workdir, 'samples'))


RELATIVE_BOUND = 0.05  # Of an array's norm: see the module docstring.
ZERO_ARRAY_SCALE = 0.01  # Of the collection's RMS element, for arrays that are zero exactly.


def test_two_processes_train_like_one(runs):
  single, _ = state_at(os.path.join(runs['base'], 'single'), 1)
  multi, data = state_at(os.path.join(runs['base'], 'multi'), 1)
  assert data['process_count'] == 2 and len(data['positions']) == 2
  assert set(single) == set(multi)
  compared = 0
  for collection in single:
    leaves = jax.tree_util.tree_leaves_with_path(single[collection])
    others = jax.tree.leaves(multi[collection])
    assert len(leaves) == len(others), collection
    floats = [np.asarray(a, np.float64) for _, a in leaves if np.asarray(a).dtype.kind == 'f']
    if not floats:  # The step and the RNG key: equal exactly.
      for (path, a), b in zip(leaves, others):
        np.testing.assert_array_equal(b, a, err_msg=collection + jax.tree_util.keystr(path))
      continue
    rms = float(np.sqrt(np.mean(np.concatenate([a.ravel() for a in floats])**2)))
    for (path, a), b in zip(leaves, others):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      allowed = RELATIVE_BOUND * (np.linalg.norm(a) + ZERO_ARRAY_SCALE * rms * np.sqrt(a.size))
      assert np.linalg.norm(b - a) <= allowed, (collection + jax.tree_util.keystr(path),
                                                np.linalg.norm(b - a), allowed)
      compared += 1
  assert compared > 50
