"""Fault tolerance with real processes: SIGTERM, SIGKILL, torn and damaged checkpoints.

One uninterrupted run of 8 steps is the reference. A second run of the same command is stopped with
SIGTERM at step 2 (it saves and exits 0), resumed and killed with SIGKILL while it trains, then
finds a torn save and a damaged newest checkpoint, and is resumed to the end. Its final state must
equal the reference bit for bit: same batches in the same order, same random numbers.
"""

import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.test_main import REPO
from tests.test_main import run_main
from tests.test_main import tiny_flags

NUM_STEPS = 8


def chain_flags(data_dir, workdir):
  # Flips on, so their random numbers are part of what must replay; 2 D steps per G step.
  return tiny_flags(data_dir, workdir, NUM_STEPS) + [
      '--config.data.random_flip=True', '--config.train.d_steps=2',
      '--config.sample_every_steps=100', '--config.sample.final_per_class=0']


def run_until(flags, pattern, sig):
  """Starts training, sends `sig` when a stderr line contains `pattern`; returns (code, log)."""
  process = subprocess.Popen([sys.executable, '-m', 'sagan_jax.main', *flags], cwd=REPO,
                             stderr=subprocess.PIPE, text=True)
  log = []
  for line in process.stderr:  # Blocks on the pipe until the line appears.
    log.append(line)
    if pattern in line:
      process.send_signal(sig)
      break
  log.extend(process.stderr)
  return process.wait(timeout=300), ''.join(log)


def final_state(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  item_names=('state', 'data'))
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                           data=ocp.args.JsonRestore()))
  return step, restored['state'], restored['data']


def largest_file(directory):
  files = [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names]
  return max(files, key=os.path.getsize)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, fake_fashion_mnist_dir):
  base = tmp_path_factory.mktemp('resume')
  reference, chain = str(base / 'reference'), str(base / 'chain')
  result = run_main(*chain_flags(fake_fashion_mnist_dir, reference))
  assert result.returncode == 0, result.stderr[-3000:]
  flags = chain_flags(fake_fashion_mnist_dir, chain)
  events = {}
  events['sigterm'] = run_until(flags + ['--config.checkpoint_every_steps=100'], 'step 2/8',
                                signal.SIGTERM)
  events['after_sigterm'] = sorted(os.listdir(os.path.join(chain, 'checkpoints')))
  events['sigkill'] = run_until(flags, 'step 7/8', signal.SIGKILL)
  checkpoints = os.path.join(chain, 'checkpoints')
  complete = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit())
  events['complete_after_kill'] = complete
  # A save cut off by a kill: Orbax's temporary directory, here with a step beyond the run's end.
  shutil.copytree(os.path.join(checkpoints, str(complete[-1])),
                  os.path.join(checkpoints, '10.orbax-checkpoint-tmp-1795000000'))
  # The newest complete checkpoint's largest array file cut in half (a damaged disk or copy).
  damaged = largest_file(os.path.join(checkpoints, str(complete[-1]), 'state'))
  with open(damaged, 'r+b') as f:
    f.truncate(os.path.getsize(damaged) // 2)
  events['damaged_step'] = complete[-1]
  events['final'] = run_main(*flags)
  return dict(reference=reference, chain=chain, events=events)


def test_sigterm_saves_the_current_step_and_exits_0(runs):
  code, log = runs['events']['sigterm']
  assert code == 0, log[-3000:]
  saved = [line for line in log.splitlines() if 'SIGTERM: saved a checkpoint at step' in line]
  assert saved, log[-3000:]
  step = int(saved[0].split('at step ')[1].split(';')[0])
  assert 2 <= step < NUM_STEPS
  assert runs['events']['after_sigterm'] == [str(step)]


def test_sigkill_then_a_damaged_checkpoint_are_survived(runs):
  events = runs['events']
  code, log = events['sigkill']
  assert code == -signal.SIGKILL, log[-3000:]
  final = events['final']
  assert final.returncode == 0, final.stderr[-3000:]
  damaged = events['damaged_step']
  assert f'Checkpoint {damaged} is unreadable' in final.stderr
  assert os.path.isdir(os.path.join(runs['chain'], 'unreadable_checkpoints', str(damaged)))
  resumed_from = max(s for s in events['complete_after_kill'] if s != damaged) if len(
      events['complete_after_kill']) > 1 else 0
  assert f'Starting at step {resumed_from} of {NUM_STEPS}' in final.stderr


def test_the_interrupted_run_ends_bit_identical_to_the_uninterrupted_one(runs):
  ref_step, ref_state, ref_data = final_state(runs['reference'])
  step, state, data = final_state(runs['chain'])
  assert ref_step == step == NUM_STEPS
  assert data == ref_data and data['positions'][0] > 0
  ref_leaves, leaves = jax.tree.leaves(ref_state), jax.tree.leaves(state)
  assert len(leaves) == len(ref_leaves) > 50
  for a, b in zip(ref_leaves, leaves):
    np.testing.assert_array_equal(a, b)
