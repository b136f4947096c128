"""Two processes on localhost (4 CPU devices each, jax.distributed over gloo) train like one.

They also stop together: SIGTERM to one process makes both save at one step (JAX's preemption
sync point) and exit 0.

Both processes run `python -m sagan_jax.main` with explicit --coordinator_address flags; the
reference is one process with 8 devices. The data set holds one image, so every global batch is the
same whichever process reads which example, and the fake latents and labels depend only on the
step. The two runs then compute the same step, with one difference: the cross-process all-reduces
(gloo) add the per-device partial sums in another order than the in-process reduction, so results
agree to float32 rounding (to 1e-4 of each array's largest magnitude after 3 steps) rather than bit
for bit. Adam's epsilon is
raised to 1e-4 because its normalized update turns rounding noise in near-zero gradients into
full-size steps.
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

  single = start(flags('single', 3), 8)
  single_log = single.communicate(timeout=600)[0]
  # The two processes would train for 1000 steps; process 1 gets SIGTERM once process 0 has
  # logged step 5, and both must save at one common step and exit 0.
  distributed = [f'--coordinator_address=localhost:{free_port()}', '--num_processes=2']
  multi = flags('multi', 1000) + ['--config.checkpoint_every_steps=3']
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


def test_two_processes_train_like_one(runs):
  single, _ = state_at(os.path.join(runs['base'], 'single'), 3)
  multi, data = state_at(os.path.join(runs['base'], 'multi'), 3)
  assert data['process_count'] == 2 and len(data['positions']) == 2
  leaves = jax.tree_util.tree_leaves_with_path(single)
  assert len(leaves) == len(jax.tree.leaves(multi)) > 50
  for (path, a), b in zip(leaves, jax.tree.leaves(multi)):
    # 1e-5 at least: biases that feed a batch norm (and their Adam moments) hold pure rounding
    # noise, of order 1e-6, because their gradient is zero in exact arithmetic.
    atol = max(1e-4 * float(np.max(np.abs(a))), 1e-5) if np.size(a) else 0.0
    np.testing.assert_allclose(b, a, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))
