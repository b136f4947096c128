"""The Fashion-MNIST demo, stage by stage: data, classifier, training, evaluation, summary.

  python -m sagan_jax.demo [--workdir=runs/fashion_mnist]
      [--fashion_mnist_dir=/usr/share/datasets/fashion-mnist] [--num_samples=10000]
      [--config.train.num_steps=...  (any field of configs/fashion_mnist.py)]

`make demo` runs it after setting up the venv and the data. Each stage starts with a header that
says what it does and about how long it takes on 2 CPU cores (scaled by the config's steps and
samples), and shows progress lines with a rate and an ETA while it runs; each tool runs as its own
process, as it would by hand:
1. data: checks the Fashion-MNIST files (one clear error naming the fix when they are missing);
2. classifier: `python -m sagan_jax.classifier`, once (WORKDIR/classifier.npz is kept and
   reused; delete it to train it again);
3. training: `python -m sagan_jax.main` (resumes from WORKDIR's newest checkpoint);
4. evaluation: `python -m sagan_jax.evaluate` on --num_samples samples of the final generator.
It ends with a summary: the scores, the table per class, the sample grids, the TensorBoard command
and how to resume or start again. `--config.FIELD=VALUE` flags reach the classifier and training.
"""

import sys

from absl import flags

from sagan_jax import cli

CONFIG = 'configs/fashion_mnist.py'
# Measured on the idle 2-core development machine (README, "The demo"); headers scale them.
CLASSIFIER_SECONDS = 190  # `python -m sagan_jax.classifier`, 10 epochs, with its start-up.
TRAIN_STEPS_PER_SECOND = 10.2  # The demo config's loop, evaluations included.
TRAIN_START_SECONDS = 30  # Start-up and compilation of the step and the evaluation.
EVAL_SAMPLES_PER_SECOND = 250  # `evaluate` with the classifier's metrics.
EVAL_START_SECONDS = 20
# The classifier's metrics: the demo has no Inception weights (README, "Evaluation").
METRICS = ('fd_classifier', 'class_accuracy', 'intra_fd_classifier')
# Batches of BigGAN's standing statistics before the final evaluation: G's BN statistics
# recomputed for the EMA weights (docs/demo.md: FD 19.8 against 25.3 over five seeds).
STANDING_STATS = 50


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', 'runs/fashion_mnist', 'Where everything is written.',
                      flag_values=fv)
  flags.DEFINE_string('fashion_mnist_dir', '/usr/share/datasets/fashion-mnist',
                      "Folder of Fashion-MNIST's IDX files.", flag_values=fv)
  flags.DEFINE_integer('num_samples', 10_000, 'Samples of the final evaluation.', flag_values=fv)
  flags.DEFINE_float('classifier_epochs', 10, "The classifier's passes over its images.",
                     flag_values=fv)


# --help answers before the imports below load jax and TensorFlow.
if __name__ == '__main__':
  cli.exit_if_help(__doc__, define_flags)

# pylint: disable=g-import-not-at-top,wrong-import-position
import glob
import json
import os
import subprocess
import time
from typing import Any, Dict, List, Optional, Sequence

from sagan_jax import progress
from sagan_jax.errors import TrainingError


def _minutes(seconds: float) -> str:
  return f'about {max(1, round(seconds / 60))} min' if seconds >= 60 else 'under a minute'


def header(index: int, title: str, text: str) -> None:
  """'== 3/4 training: ... ==' on stdout (flushed: the tools' lines follow on stderr)."""
  print(f'\n== {index}/4 {title}: {text}', flush=True)


def run_stage(module: str, args: Sequence[str]) -> None:
  """`python -m MODULE ARGS` with this terminal; TrainingError naming the stage when it fails."""
  start = time.perf_counter()
  code = subprocess.call([sys.executable, '-m', module, *args])
  if code:
    raise TrainingError(f'{module} stopped with exit code {code} (its error is above); fix it '
                        'and run the demo again: finished stages are kept')
  print(f'   ({module} took {progress.format_seconds(time.perf_counter() - start)})',
        flush=True)


def _config(overrides: Sequence[str]):
  """The demo's config with the --config.FIELD=VALUE overrides (ConfigError for bad ones)."""
  return cli.parse_flags(['demo', f'--config={CONFIG}', *overrides], lambda fv: None,
                         takes_config=True).config


def check_data(data_dir: str, config) -> None:
  """ConfigError naming the fix when the Fashion-MNIST files are not there."""
  cli.import_tensorflow()
  from sagan_jax import data_sources  # TensorFlow: after the flags.
  with config.unlocked():
    config.data.fashion_mnist_dir = data_dir
  data_sources.check_source(config.data)


def run(workdir: str, data_dir: str, num_samples: int, classifier_epochs: float,
        overrides: Sequence[str]) -> Dict[str, Any]:
  """The four stages, then the summary's facts (summary())."""
  config = _config(overrides)
  data = [f'--config.data.fashion_mnist_dir={data_dir}', *overrides]
  header(1, 'data', f'Fashion-MNIST from {data_dir}')
  check_data(data_dir, config)
  print('   found the training and test images', flush=True)
  classifier = os.path.join(workdir, 'classifier.npz')
  header(2, 'classifier', 'a small CNN trained on the 10,000 test images scores the samples '
         f'({_minutes(CLASSIFIER_SECONDS * classifier_epochs / 10)} on 2 cores)')
  if os.path.exists(classifier):
    print(f'   {classifier} exists: kept (delete it to train it again)', flush=True)
  else:
    run_stage('sagan_jax.classifier', [f'--config={CONFIG}', *data, f'--out={classifier}',
                                       f'--epochs={classifier_epochs}'])
  steps = config.train.num_steps
  expected = _minutes(TRAIN_START_SECONDS + steps / TRAIN_STEPS_PER_SECOND)
  header(3, 'training', f'{steps} steps of SAGAN ({expected} on 2 cores); resumes from '
         f'{workdir} if it holds a checkpoint')
  run_stage('sagan_jax.main', [f'--config={CONFIG}', f'--workdir={workdir}', *data])
  expected = _minutes(EVAL_START_SECONDS + num_samples / EVAL_SAMPLES_PER_SECOND)
  header(4, 'evaluation', f'{num_samples} samples of the final generator scored by the '
         f'classifier ({expected})')
  run_stage('sagan_jax.evaluate', [f'--workdir={workdir}', f'--num_samples={num_samples}',
                                   f'--metrics={",".join(METRICS)}',
                                   f'--standing_stats={STANDING_STATS}'])
  return summary_facts(workdir)


def _newest(pattern: str) -> Optional[str]:
  paths = sorted(glob.glob(pattern))
  return paths[-1] if paths else None


def summary_facts(workdir: str) -> Dict[str, Any]:
  """What the summary shows: the newest evaluation's JSON and the sample files."""
  path = _newest(os.path.join(workdir, 'eval', 'step_' + '[0-9]' * 7 + '*.json'))
  if path is None:
    raise TrainingError(f'no evaluation in {workdir}/eval: run python -m sagan_jax.evaluate '
                        f'--workdir={workdir}')
  with open(path) as f:
    result = json.load(f)
  samples = os.path.join(workdir, 'samples.npz')
  return {'workdir': workdir, 'eval_json': path, 'result': result,
          'grid': _newest(os.path.join(workdir, 'samples', 'step_*.png')),
          'samples_npz': samples if os.path.exists(samples) else None}


def summary(facts: Dict[str, Any]) -> List[str]:
  """The closing lines: scores, the table per class, files, TensorBoard, resume or restart."""
  from sagan_jax.evaluation import per_class  # pylint: disable=g-import-not-at-top
  result, workdir = facts['result'], facts['workdir']
  lines = ['', '== summary', f"scores of step {result['step']} ({result['num_samples']} "
           f"samples, {result['generator']} generator; {facts['eval_json']}):"]
  lines += [f'  {name} = {value:.4g}' for name, value in sorted(result['scores'].items())]
  if result.get('per_class'):
    lines += ['per class (held-out: the classifier on real images of the class):']
    lines += [f'  {line}' for line in per_class.format_table(result['per_class'])]
    accuracy = result.get('details', {}).get('class_accuracy')
    if accuracy:
      lines.append(f'  {per_class.worst_class_summary(accuracy)}')
  if facts['grid']:
    lines.append(f"sample grid (one row per class): {facts['grid']}; every grid: "
                 f'{os.path.dirname(facts["grid"])}/')
  if facts['samples_npz']:
    lines.append(f"final samples of every class: {facts['samples_npz']}")
  lines += [f'TensorBoard: tensorboard --logdir={workdir}',
            f'resume or train longer: make demo again (or python -m sagan_jax.main '
            f'--config={CONFIG} --workdir={workdir} --config.train.num_steps=N)',
            f'start again: rm -rf {workdir} && make demo']
  return lines


def demo(fv: flags.FlagValues, overrides: Sequence[str]) -> int:
  facts = run(fv.workdir, fv.fashion_mnist_dir, fv.num_samples, fv.classifier_epochs, overrides)
  print('\n'.join(summary(facts)), flush=True)
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  overrides = [a for a in argv[1:] if a.startswith('--config.')]
  rest = [a for a in argv if not a.startswith('--config.')]
  return cli.run_tool(__doc__, define_flags, lambda fv: demo(fv, overrides), rest)


if __name__ == '__main__':
  sys.exit(main())
