"""`python -m sagan_jax.main` end to end: 3 steps, outputs, resume, and one-line errors."""

import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_flags(data_dir, workdir, num_steps):
  return [
      f'--workdir={workdir}', '--config=configs/fashion_mnist.py',
      f'--config.data.fashion_mnist_dir={data_dir}', '--config.data.shuffle_buffer=64',
      '--config.model.ch=8', '--config.train.batch_size=8', f'--config.train.num_steps={num_steps}',
      '--config.log_every_steps=1', '--config.sample_every_steps=2',
      '--config.checkpoint_every_steps=2', '--config.checkpoint_every_minutes=0',
      '--config.sample.num_columns=2', '--config.sample.final_per_class=2'
  ]


def run_main(*flags, cwd=REPO):
  return subprocess.run([sys.executable, '-m', 'sagan_jax.main', *flags],
                        cwd=cwd,
                        capture_output=True,
                        text=True,
                        timeout=600,
                        check=False)


def listing(directory):
  return sorted(
      os.path.relpath(os.path.join(root, f), directory)
      for root, _, files in os.walk(directory)
      for f in files)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, fake_fashion_mnist_dir):
  workdir = str(tmp_path_factory.mktemp('run'))
  # The first run gets a relative --workdir (as `make demo` passes) and an absolute config path.
  flags = tiny_flags(fake_fashion_mnist_dir, os.path.basename(workdir), 3)
  flags[1] = f'--config={REPO}/configs/fashion_mnist.py'
  first = run_main(*flags, cwd=os.path.dirname(workdir))
  assert first.returncode == 0, first.stderr[-3000:]
  files_after_first = listing(workdir)
  resumed = run_main(*tiny_flags(fake_fashion_mnist_dir, workdir, 5))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  return dict(workdir=workdir,
              data_dir=fake_fashion_mnist_dir,
              first=first,
              resumed=resumed,
              files_after_first=files_after_first)


def test_three_steps_write_checkpoints_samples_and_logs(trained):
  files = trained['files_after_first']
  assert {'samples/step_0000002.png', 'samples/step_0000003.png', 'samples.npz'} <= set(files)
  assert any(f.startswith('checkpoints/2/') for f in files)
  assert any(f.startswith('checkpoints/3/') for f in files)
  assert any('events.out.tfevents' in f for f in files)
  log = trained['first'].stderr
  assert 'Starting at step 0 of 3' in log
  assert 'step 3/3' in log and 'steps/s' in log and 'ETA' in log and 'd_loss=' in log


def test_sample_grid_has_one_row_per_class(trained):
  grid = np.asarray(Image.open(os.path.join(trained['workdir'], 'samples', 'step_0000002.png')))
  assert grid.shape == (10 * 32, 2 * 32)  # 10 classes x 2 fixed latents, grayscale.
  assert grid.std() > 0
  samples = np.load(os.path.join(trained['workdir'], 'samples.npz'))
  assert samples['images'].shape == (20, 32, 32, 1) and samples['images'].dtype == np.uint8
  np.testing.assert_array_equal(samples['labels'], np.repeat(np.arange(10), 2))


def test_resume_continues_from_the_newest_checkpoint(trained):
  log = trained['resumed'].stderr
  assert 'Starting at step 3 of 5' in log
  assert 'step 4/5' in log and 'step 1/5' not in log
  checkpoints = os.listdir(os.path.join(trained['workdir'], 'checkpoints'))
  assert {'4', '5'} <= set(checkpoints)


def test_non_finite_parameters_stop_before_a_checkpoint_is_written(trained):
  checkpoints = os.path.join(trained['workdir'], 'checkpoints')
  before = listing(checkpoints)
  # D's biases jump to 1e38 in the D step of step 6 (Adam moves each parameter by about the
  # learning rate): finite, but G's loss through D overflows in the same step.
  result = run_main(*tiny_flags(trained['data_dir'], trained['workdir'], 7),
                    '--config.train.d_lr=1e38')
  assert result.returncode == 3, result.stderr[-2000:]
  last_line = result.stderr.strip().splitlines()[-1]
  assert 'non-finite loss or parameters at step 6' in last_line
  assert 'newest checkpoint (step 5)' in last_line
  assert listing(checkpoints) == before  # Steps 6 and 7 were never saved.


def run_sample(*flags):
  return subprocess.run([sys.executable, '-m', 'sagan_jax.sample', *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=600, check=False)


def test_sample_cli_restores_the_generator_alone(trained):
  workdir = trained['workdir']
  result = run_sample(f'--workdir={workdir}', '--step=4', '--num_per_class=3', '--truncation=0.5',
                      '--num_samples=7', '--interp_classes=2,5')
  assert result.returncode == 0, result.stderr[-3000:]
  out = os.path.join(workdir, 'generated')
  for kind in ('', '_random', '_truncated', '_interp_z', '_interp_class'):
    grid = np.asarray(Image.open(os.path.join(out, f'step_0000004{kind}.png')))
    assert grid.shape == (10 * 32, 3 * 32) and grid.std() > 0, kind
  samples = np.load(os.path.join(out, 'step_0000004.npz'))
  assert samples['images'].shape == (7, 32, 32, 1) and samples['images'].dtype == np.uint8
  assert samples['labels'].shape == (7,) and set(samples['labels']) <= set(range(10))
  assert samples['truncation'] == np.float32(0.5)
  bad = run_sample(f'--workdir={workdir}', '--step=99')
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1] == (
      f"error: no checkpoint of step 99 in {workdir}/checkpoints: use one of [3, 4, 5]")


def test_load_generator_gives_the_saved_ema_weights(trained):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from sagan_jax import checkpointing  # pylint: disable=g-import-not-at-top
  config, generator, params, g_state, step = checkpointing.load_generator(trained['workdir'])
  assert step == 5 and config.model.ch == 8 and generator.resolution == 32
  manager = ocp.CheckpointManager(os.path.join(trained['workdir'], 'checkpoints'),
                                  item_names=checkpointing.ITEMS)
  state = manager.restore(5, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  saved = jax.tree.leaves(state['ema_g_params'])
  assert len(saved) == len(jax.tree.leaves(params))
  for a, b in zip(jax.tree.leaves(params), saved):
    np.testing.assert_array_equal(a, b)
  assert set(g_state) == {'spectral', 'batch_stats'}
  # One-hot labels (what class interpolations blend) give exactly the integer labels' images.
  z = jax.random.normal(jax.random.PRNGKey(0), (4, config.model.z_dim))
  labels = np.array([0, 3, 9, 3], np.int32)
  hard = generator.apply({'params': params, **g_state}, z, labels, train=False)
  soft = generator.apply({'params': params, **g_state}, z, np.eye(10, dtype=np.float32)[labels],
                         train=False)
  np.testing.assert_allclose(soft, hard, atol=1e-6)
