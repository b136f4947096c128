"""`python -m sagan_jax.demo` (what `make demo` runs) on tiny settings, and the progress lines."""

import logging
import os
import re
import subprocess
import sys

from sagan_jax import progress
from tests.conftest import make_fake_fashion_mnist
from tests.test_main import REPO


def test_progress_lines_give_count_share_rate_and_eta_and_read_values_only_when_logged(caplog):
  reads = []

  def value():
    reads.append(1)
    return '0.500'

  with caplog.at_level(logging.INFO):
    with progress.Progress('things', 4, 'steps', every_secs=0.0, enabled=True) as bar:
      for _ in range(4):
        bar.update(accuracy=value)
    with progress.Progress('quiet', 4, 'steps', every_secs=1e9, enabled=True) as bar:
      bar.update(4, accuracy=value)
    with progress.Progress('off', 4, 'steps', every_secs=0.0, enabled=False) as bar:
      bar.update(2, accuracy=value)
  lines = [r.getMessage() for r in caplog.records]
  # 3 interval lines (not at the last step: the closing line says it) + 1 closing line each.
  assert len(lines) == 5 and len(reads) == 5, lines
  assert re.fullmatch(r'things: 1/4 steps \(25%\), [\d.,]+ steps/s, ETA [\d:]+, accuracy 0\.500',
                      lines[0]), lines[0]
  assert re.fullmatch(r'things: 4/4 steps \(100%\), [\d.,]+ steps/s, done in [\d:]+, accuracy '
                      r'0\.500', lines[3]), lines[3]
  assert lines[4].startswith('quiet: 4/4 steps (100%)')


def test_every_eta_and_duration_reads_minutes_and_seconds_or_hours():
  assert [progress.format_seconds(t) for t in (0, 59.4, 59.6, 117, 3599, 3600, 3723, 90061)] == [
      '0:00', '0:59', '1:00', '1:57', '59:59', '1:00:00', '1:02:03', '25:01:01']


def test_the_demo_shows_each_stage_with_progress_and_a_summary_of_files_that_exist(tmp_path):
  data_dir, workdir = str(tmp_path / 'data'), str(tmp_path / 'demo')
  os.makedirs(data_dir)
  make_fake_fashion_mnist(data_dir, num_train=160, num_test=40)  # > 128 reference images.
  run = subprocess.run(
      [sys.executable, '-m', 'sagan_jax.demo', f'--workdir={workdir}',
       f'--fashion_mnist_dir={data_dir}', '--num_samples=200',
       '--classifier_epochs=2', '--config.model.ch=8', '--config.train.batch_size=8',
       '--config.train.num_steps=2', '--config.log_every_steps=1', '--config.eval.every_steps=0',
       '--config.checkpoint_every_minutes=0', '--config.sample.num_columns=2',
       '--config.sample.final_per_class=2', '--config.data.shuffle_buffer=64'],
      cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
  output = run.stdout + run.stderr
  assert run.returncode == 0, output[-3000:]
  for index, stage in enumerate(('data', 'classifier', 'training', 'evaluation'), 1):
    assert f'== {index}/4 {stage}:' in run.stdout
  # Progress of each long stage: classifier training, the training loop, the samples' features.
  assert re.search(r'classifier training: \d+/\d+ steps \(100%\), .* steps/s, done in', output)
  assert re.search(r'features of real images: \d+/\d+ images \(100%\)', output)
  assert re.search(r'step 2/2 +[\d.]+ steps/s +ETA', output)
  assert re.search(r'samples and their features: 200/200 samples \(100%\)', output)
  summary = run.stdout[run.stdout.index('== summary'):]
  assert 'class_accuracy = ' in summary and 'worst class ' in summary
  named = re.findall(r'(/\S+\.(?:json|png|npz))', summary)
  assert len(named) >= 3 and all(os.path.exists(path) for path in named), named
  assert f'tensorboard --logdir={workdir}' in summary
  assert 'Traceback' not in output
