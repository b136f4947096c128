"""Scores a checkpoint's generator: FID, IS, KID, precision/recall and the classifier's metrics.

  python -m sagan_jax.evaluate --workdir=DIR [--step=N | --best] [--raw] [--num_samples=50000]
      [--batch_size=256] [--truncation=T] [--standing_stats=N] [--metrics=fid,is,...]
      [--reference_stats=PATH] [--inception_path=PATH] [--classifier=PATH] [--seed=0]

restores only the generator (the EMA weights unless --raw) of the newest checkpoint, of step N,
or of WORKDIR/best (--best: the step with the best eval.best_metric seen during training), draws
--num_samples samples with labels uniform over the classes and scores them (sagan_jax.evaluation;
the metrics are the entries of sagan_jax/evaluation/registry.py).
Where the files come from, when the flag is not given: the FID Inception weights from
eval.inception_path of the checkpoint's config, then $SAGAN_INCEPTION_PATH; the reference
statistics from eval.reference_stats; the classifier from eval.classifier_path, then
WORKDIR/classifier.npz. A metric whose file is missing is skipped with one log line.
The scores go to stdout, to DIR/eval/step_N[_best][_raw][_truncT][_standingN].json (with the
number of samples, the generator, the feature networks and reference files used) and to
TensorBoard in DIR (scalars eval[_best][_raw]...[/fid] at the checkpoint's step). With the
classifier's metrics, stdout also shows a table per class (accuracy, the classifier's held-out
accuracy of the class, their ratio, the class most often taken for, intra-FD) and the worst class;
the JSON holds the metrics' `details` and that table as `per_class`.
"""

import json
import sys
import time
from typing import Any, Dict, Optional, Tuple

from absl import flags
from absl import logging

from sagan_jax import cli
from sagan_jax.errors import ConfigError


def _variant(best: bool, use_ema: bool, truncation: float, standing_stats: int) -> str:
  """'_best_raw_trunc0.5_standing100'-style suffix naming the non-default settings."""
  parts = (['best'] if best else []) + ([] if use_ema else ['raw'])
  parts += [f'trunc{truncation:g}'] if truncation else []
  parts += [f'standing{standing_stats}'] if standing_stats else []
  return ''.join(f'_{p}' for p in parts)


def run(workdir: str, step: Optional[int] = None, use_ema: bool = True, best: bool = False,
        **overrides) -> Tuple[Dict[str, Any], Any]:
  """Evaluates a checkpoint of WORKDIR and writes the JSON and TensorBoard scalars.

  `overrides` are evaluation.Settings fields (num_samples, batch_size, metrics, ...); None keeps
  the checkpoint config's value. Returns (the result written to the JSON file, its epath).
  """
  # pylint: disable=g-import-not-at-top  (jax, clu and TensorFlow load after the flags)
  cli.import_tensorflow()
  from clu import metric_writers
  from etils import epath
  import jax
  from sagan_jax import checkpointing
  from sagan_jax import evaluation
  from sagan_jax import sharding
  from sagan_jax.evaluation import per_class
  best_metadata = None
  if best:
    if step is not None:
      raise ConfigError('--best and --step pick different checkpoints: pass one of them')
    config, generator, params, g_state, step, best_metadata = (
        checkpointing.load_best_generator(workdir, use_ema))
  else:
    config, generator, params, g_state, step = checkpointing.load_generator(workdir, step, use_ema)
  settings = evaluation.settings_from_config(config, **overrides)
  mesh = sharding.create_mesh(jax.local_devices())
  evaluator = evaluation.create_evaluator(config, generator, mesh, settings, workdir)
  if not evaluator.enabled:
    reasons = '; '.join(f'{k}: {v}' for k, v in evaluator.skipped.items())
    raise ConfigError(f'no metric can run ({reasons}): pass --inception_path and '
                      '--reference_stats, or --classifier (see --help)')
  logging.info('Evaluating step %d (%s generator) on %d samples: %s', step,
               'EMA' if use_ema else 'raw', settings.num_samples, ', '.join(
                   evaluator.metric_names))
  start = time.perf_counter()
  scores = evaluator(params, g_state, show_progress=True)
  result = {'step': step, 'workdir': str(workdir),
            'checkpoint': 'best' if best else 'checkpoints', 'best': best_metadata,
            'generator': 'ema' if use_ema else 'raw', 'num_samples': settings.num_samples,
            'scores': scores, 'details': evaluator.details,
            'per_class': per_class.merge(evaluator.details), **evaluator.describe(),
            'seconds': round(time.perf_counter() - start, 1)}
  variant = _variant(best, use_ema, settings.truncation, settings.standing_stats)
  path = epath.Path(workdir) / 'eval' / f'step_{step:07d}{variant}.json'
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True))
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_scalars(step, {f'eval{variant}/{k}': v for k, v in scores.items()})
  writer.close()
  return result, path


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'Training workdir (local or gs://).', flag_values=fv)
  flags.DEFINE_integer('step', None, 'Checkpoint step; the newest when not given.',
                       flag_values=fv)
  flags.DEFINE_bool('best', False, 'The checkpoint in WORKDIR/best.', flag_values=fv)
  flags.DEFINE_bool('raw', False, "G's raw weights instead of the EMA.", flag_values=fv)
  flags.DEFINE_integer('num_samples', 50_000, 'Samples to score.', flag_values=fv)
  flags.DEFINE_integer('batch_size', None, 'Samples generated per batch over all devices '
                       '(default eval.batch_size).', flag_values=fv)
  flags.DEFINE_float('truncation', None, 'Truncation threshold of z (0: plain N(0, I); default '
                     "the run's eval.truncation, as its training-time evaluations).",
                     flag_values=fv)
  flags.DEFINE_integer('standing_stats', None, 'Recompute BN statistics from this many batches '
                       "of G in training mode first (0: off; default the run's "
                       'eval.standing_stats).', flag_values=fv)
  flags.DEFINE_list('metrics', None, 'Comma-separated metric names: fid, is, kid, '
                    'precision_recall, fd_classifier, class_accuracy, intra_fd_classifier or '
                    'another of sagan_jax/evaluation/registry.py (default: all).',
                    flag_values=fv)
  flags.DEFINE_string('reference_stats', None, 'Reference .npz (sagan_jax.reference_stats).',
                      flag_values=fv)
  flags.DEFINE_string('inception_path', None, 'FID Inception weights (.pth or converted .npz).',
                      flag_values=fv)
  flags.DEFINE_string('classifier', None, 'Classifier .npz (sagan_jax.classifier).',
                      flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'Seed of the latents and labels.', flag_values=fv)


def evaluate(fv: flags.FlagValues) -> int:
  """The tool: scores the checkpoint and prints the scores and the JSON's path."""
  # pylint: disable=g-import-not-at-top  (after the flags: --help loads no metrics)
  from sagan_jax.evaluation import registry
  metrics = tuple(m.strip() for m in fv.metrics) if fv.metrics else registry.metric_names()
  result, path = run(fv.workdir, fv.step, not fv.raw, fv.best, num_samples=fv.num_samples,
                     batch_size=fv.batch_size, truncation=fv.truncation,
                     standing_stats=fv.standing_stats, metrics=metrics,
                     reference_stats=fv.reference_stats, inception_path=fv.inception_path,
                     classifier_path=fv.classifier, seed=fv.seed)
  print(f"step {result['step']} ({result['generator']} generator, {result['num_samples']} "
        'samples):')
  for name, value in result['scores'].items():
    print(f'  {name}: {value:.6g}')
  for name, reason in result['skipped'].items():
    print(f'  {name}: skipped ({reason})')
  _print_per_class(result)
  print(f'wrote {path}')
  return 0


def _print_per_class(result: Dict[str, Any]) -> None:
  """The per-class table and the worst class, when a per-class metric ran."""
  # pylint: disable=g-import-not-at-top  (after the flags: --help loads no metrics)
  from sagan_jax.evaluation import per_class
  if not result['per_class']:
    return
  print('per class:')
  for line in per_class.format_table(result['per_class']):
    print(f'  {line}')
  accuracy = result['details'].get('class_accuracy')
  if accuracy:
    print(f"  {per_class.worst_class_summary(accuracy)}")
    if accuracy['heldout_missing']:
      print(f"  held-out: none per class ({accuracy['heldout_missing']})")


def main(argv=None) -> int:
  return cli.run_tool(__doc__, define_flags, evaluate, argv, required=('workdir',))


if __name__ == '__main__':
  sys.exit(main())
