"""The metrics: one registry entry each, which the rest of evaluation reads.

An entry (`Metric`) names the feature network the metric reads, the inputs it needs, the scores
it writes (each better lower, better higher, or not a ranking score) and the function computing
them. From the entries, the evaluator loads the networks and reference statistics the requested
metrics read, keeps what they need while sampling (logits, feature rows) and calls their
functions; `eval.metrics` and `eval.best_metric` are checked against them, and the best checkpoint
(sagan_jax.checkpointing.BestCheckpoint) takes its ranking direction from them.

A new metric is one `register(Metric(...))` below: its function receives `Inputs` (its network's
outputs over the samples, that network's reference statistics of real images, the labels, the
network's description) and returns its scores, or a `Result` of its scores and details (the
results that are no single number: per-class tables and the like, JSON-able; the evaluate tool
writes them to its JSON file, the training loop to WORKDIR/eval/train_step_N.json). It raises
`Skip(reason)` when its inputs are there but cannot give a score (the evaluator reports the metric
as skipped, with the reason naming the fix, and the other metrics run). A new feature network also
needs a loader in evaluator.py.

The built-in metrics (conventions: sagan_jax.evaluation.metrics):
- fid, is (+ is_std), kid (+ kid_std), precision_recall (precision, recall): pytorch-fid's FID
  Inception; all but IS compare with reference statistics of the training images.
- fd_classifier, class_accuracy, intra_fd_classifier: the small classifier trained on the data set
  (for data sets without Inception weights); fd_classifier is a Frechet distance in its 128-d
  features (not FID, not comparable with it), class_accuracy the share of class-conditional
  samples it classifies as the class they were generated for (+ worst_class_accuracy, that share
  in the worst class; the per-class table in its details), intra_fd_classifier the mean over
  classes of the Frechet distance between a class's samples and its real images (per_class.py).
"""

import dataclasses
import enum
from typing import Any, Callable, Dict, FrozenSet, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np

from sagan_jax.errors import ConfigError
from sagan_jax.evaluation import metrics
from sagan_jax.evaluation import per_class

NETWORKS = ('inception', 'classifier')  # The feature networks the evaluator can load.
LOWER, HIGHER = 'lower', 'higher'  # Which way a score is better; None: it ranks nothing.


class Input(enum.Enum):
  """What a metric reads."""
  FAKE_STATISTICS = 'fake statistics'  # Mean and covariance of the samples' features (always).
  FAKE_FEATURES = 'fake features'  # The first metrics.REFERENCE_FEATURES_KEPT feature rows.
  LOGITS = 'logits'  # Every sample's logits (kept only when a metric reads them).
  LABELS = 'labels'  # The class each sample was generated for.
  REFERENCE = 'reference'  # The network's statistics (mu, sigma) of real images.
  REAL_FEATURES = 'real features'  # Real feature rows, kept in the reference file.
  # The samples' features' mean and covariance per class (kept only when a metric reads them).
  FAKE_CLASS_STATISTICS = 'fake class statistics'
  CLASS_REFERENCE = 'class reference'  # The network's statistics of real images per class.


class Skip(Exception):
  """Raised by a metric's function: no score from these inputs; the message says why and names
  the fix (one line)."""


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What a metric's function receives; what its `needs` does not name may be missing.

  Attributes:
    fake: its network's outputs over the samples (evaluation.features.FeatureSet): `stats`, a
      metrics.RunningStatistics (statistics(), kept()), `logits()` and `class_stats` (a
      per_class.ClassStatistics).
    reference: its network's statistics of real images (metrics.Reference; `classes`: per class),
      or None.
    labels: the class each sample was generated for, int [num_samples], or None.
    network_info: its network's description (FeatureNet.description; the classifier's holds its
      file's metadata: num_classes, class_names, heldout_per_class_accuracy, ...).
  """
  fake: Any
  reference: Optional[metrics.Reference]
  labels: Optional[np.ndarray]
  network_info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Result(NamedTuple):
  """What a metric's function may return instead of its scores alone: the scores and `details`,
  its results that are no single number (JSON-able: dicts, lists, str, numbers, None)."""
  scores: Dict[str, float]
  details: Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Metric:
  """One metric.

  Attributes:
    name: its name in eval.metrics and --metrics.
    network: the feature network it reads (one of NETWORKS).
    needs: the inputs it reads.
    scores: the scores it writes, each LOWER or HIGHER (better), or None when it ranks nothing.
    compute: Inputs -> {score: value} for exactly `scores`, or a Result of those and details;
      raises Skip when the inputs give no score.
    check_samples: (name, num_samples, feature net) -> None, raising ConfigError when there are
      too few samples for the metric; None: any number will do.
  """
  name: str
  network: str
  needs: FrozenSet[Input]
  scores: Mapping[str, Optional[str]]
  compute: Callable[[Inputs], Union[Dict[str, float], Result]]
  check_samples: Optional[Callable[[str, int, Any], None]] = None

  @property
  def needs_reference(self) -> bool:
    return bool({Input.REFERENCE, Input.REAL_FEATURES, Input.CLASS_REFERENCE} & self.needs)


REGISTRY: Dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
  """Adds `metric`; ValueError when its name or one of its score names is taken."""
  if metric.name in REGISTRY:
    raise ValueError(f'a metric named {metric.name!r} is registered already')
  taken = sorted(set(metric.scores) & {s for m in REGISTRY.values() for s in m.scores})
  if taken:
    raise ValueError(f'metric {metric.name!r}: another metric writes the score {taken[0]!r}')
  if metric.network not in NETWORKS:
    raise ValueError(f'metric {metric.name!r} reads an unknown network {metric.network!r} '
                     f'(known: {", ".join(NETWORKS)})')
  wrong = [d for d in metric.scores.values() if d not in (LOWER, HIGHER, None)]
  if wrong:
    raise ValueError(f'metric {metric.name!r}: a score is better {LOWER!r}, {HIGHER!r} or None, '
                     f'not {wrong[0]!r}')
  REGISTRY[metric.name] = metric
  return metric


def unregister(name: str) -> None:
  del REGISTRY[name]


def metric_names() -> Tuple[str, ...]:
  return tuple(REGISTRY)


def get(name: str) -> Metric:
  """The metric called `name`; ConfigError naming the choices when there is none."""
  if name not in REGISTRY:
    raise ConfigError(f'unknown metric {name!r}: choose eval.metrics (--metrics) among '
                      f'{", ".join(REGISTRY)}')
  return REGISTRY[name]


def score_direction(score: str) -> Optional[str]:
  """LOWER or HIGHER when `score` ranks checkpoints that way; None when it ranks nothing."""
  return next((m.scores[score] for m in REGISTRY.values() if score in m.scores), None)


def ranking_scores() -> Tuple[str, ...]:
  """The scores that rank checkpoints (eval.best_metric's choices)."""
  return tuple(s for m in REGISTRY.values() for s, d in m.scores.items() if d is not None)


def metric_of_score(score: str) -> str:
  """The metric that writes `score` (the score itself when no metric does)."""
  return next((m.name for m in REGISTRY.values() if score in m.scores), score)


# ----------------------------------------------------------------------------------------------
# The built-in metrics.


def _more_samples_than_features(name: str, num: int, net) -> None:
  if num <= net.feature_dim:
    raise ConfigError(f'{num} samples of {net.feature_dim}-d {net.name} features give a '
                      f'singular covariance: {name} needs more samples than features; set '
                      f'--num_samples (eval.num_samples) to at least {net.feature_dim + 1} '
                      '(50,000 is the standard for FID)')


def _ten_splits(name: str, num: int, net) -> None:
  del name, net  # Unused.
  if num < 10:
    raise ConfigError(f'the Inception Score uses 10 splits: set --num_samples '
                      f'(eval.num_samples) to at least 10, not {num}')


def _frechet_distance(score: str) -> Callable[[Inputs], Dict[str, float]]:
  def compute(inputs: Inputs) -> Dict[str, float]:
    return {score: metrics.frechet_distance(*inputs.fake.stats.statistics(),
                                            inputs.reference.mu, inputs.reference.sigma)}
  return compute


def _inception_score(inputs: Inputs) -> Dict[str, float]:
  mean, std = metrics.inception_score(inputs.fake.logits())
  return {'is': mean, 'is_std': std}


def _kernel_inception_distance(inputs: Inputs) -> Dict[str, float]:
  mean, std = metrics.kernel_inception_distance(inputs.reference.features,
                                                inputs.fake.stats.kept())
  return {'kid': mean, 'kid_std': std}


def _precision_recall(inputs: Inputs) -> Dict[str, float]:
  real, generated = inputs.reference.features, inputs.fake.stats.kept()
  count = min(len(real), len(generated))  # The same number of samples from each side.
  precision, recall = metrics.precision_recall(real[:count], generated[:count])
  return {'precision': precision, 'recall': recall}


def _heldout_missing(info: Mapping[str, Any]) -> Optional[str]:
  """Why the classifier's description has no per-class held-out accuracies, or None."""
  if 'heldout_per_class_accuracy' not in info:
    return ('the classifier file predates per-class held-out accuracies: retraining the '
            'classifier (python -m sagan_jax.classifier) adds them')
  if info['heldout_per_class_accuracy'] is None:
    return 'the classifier was measured on no held-out split (--heldout_split)'
  return None


def _class_accuracy(inputs: Inputs) -> Result:
  logits, info = inputs.fake.logits(), inputs.network_info
  predicted = np.argmax(logits, axis=1)
  table = per_class.class_accuracy_table(predicted, inputs.labels, logits.shape[1],
                                         info.get('class_names'),
                                         info.get('heldout_per_class_accuracy'))
  table['heldout_missing'] = _heldout_missing(info)
  return Result({'class_accuracy': float(np.mean(predicted == inputs.labels)),
                 'worst_class_accuracy': table['worst']['accuracy']}, table)


def _intra_frechet_distance(inputs: Inputs) -> Result:
  fake, real = inputs.fake.class_stats, inputs.reference.classes
  reason = per_class.intra_fd_skip_reason(fake, real, real.mu.shape[1])
  if reason:
    raise Skip(reason)
  rows = per_class.intra_fd_table(fake, real, inputs.network_info.get('class_names'))
  return Result({'intra_fd_classifier': float(np.mean([r['intra_fd'] for r in rows]))},
                {'classes': rows})


_STATS, _FEATURES = Input.FAKE_STATISTICS, Input.FAKE_FEATURES
register(Metric('fid', 'inception', frozenset({_STATS, Input.REFERENCE}), {'fid': LOWER},
                _frechet_distance('fid'), _more_samples_than_features))
register(Metric('is', 'inception', frozenset({Input.LOGITS}), {'is': HIGHER, 'is_std': None},
                _inception_score, _ten_splits))
register(Metric('kid', 'inception', frozenset({_FEATURES, Input.REAL_FEATURES}),
                {'kid': LOWER, 'kid_std': None}, _kernel_inception_distance))
register(Metric('precision_recall', 'inception', frozenset({_FEATURES, Input.REAL_FEATURES}),
                {'precision': HIGHER, 'recall': HIGHER}, _precision_recall))
register(Metric('fd_classifier', 'classifier', frozenset({_STATS, Input.REFERENCE}),
                {'fd_classifier': LOWER}, _frechet_distance('fd_classifier'),
                _more_samples_than_features))
register(Metric('class_accuracy', 'classifier', frozenset({Input.LOGITS, Input.LABELS}),
                {'class_accuracy': HIGHER, 'worst_class_accuracy': HIGHER}, _class_accuracy))
register(Metric('intra_fd_classifier', 'classifier',
                frozenset({Input.FAKE_CLASS_STATISTICS, Input.CLASS_REFERENCE}),
                {'intra_fd_classifier': LOWER}, _intra_frechet_distance))
