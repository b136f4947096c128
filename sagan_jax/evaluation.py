"""Scores a generator: which metrics run on which features, settings, the best checkpoint.

Samples and features come from the compiled, sharded functions of sagan_jax.features; the
metrics (sagan_jax.metrics) run on the host in float64.

Feature networks (features.FeatureNet):
- 'inception': pytorch-fid's FID Inception-v3 (sagan_jax.inception). Its pool3 features give FID,
  KID and precision/recall against reference statistics of the training images
  (`python -m sagan_jax.reference_stats`), its logits the Inception Score.
- 'classifier': a small classifier trained on the data set itself (sagan_jax.classifier), for
  data sets without Inception weights. Its 128-d features give `fd_classifier` (a Frechet
  distance against the training images' features: not FID, and not comparable with it) and its
  predictions `class_accuracy`, the share of class-conditional samples classified as their class.
A metric whose network, weights or reference is missing is skipped with one log line that says
why; the others run.
"""

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple

from absl import logging
from etils import epath
import jax
import numpy as np

from sagan_jax import checkpointing
from sagan_jax import features
from sagan_jax import inception
from sagan_jax import metrics
from sagan_jax.errors import ConfigError

# Each metric and the network it reads.
METRICS = {'fid': 'inception', 'is': 'inception', 'kid': 'inception',
           'precision_recall': 'inception', 'fd_classifier': 'classifier',
           'class_accuracy': 'classifier'}
# The scores the metrics write, and whether lower is better (eval.best_metric picks one).
SCORES = {'fid': True, 'is': False, 'is_std': None, 'kid': True, 'kid_std': None,
          'precision': False, 'recall': False, 'fd_classifier': True, 'class_accuracy': False}
SCORE_METRIC = {'is_std': 'is', 'kid_std': 'kid', 'precision': 'precision_recall',
                'recall': 'precision_recall'}  # Other scores are named as their metric.
CLASSIFIER_FILE = 'classifier.npz'  # Looked for in the workdir when eval.classifier_path is unset.
REFERENCE_HINT = ('python -m sagan_jax.reference_stats --config=<the training config> '
                  '--out=PATH')


def check_reference(reference: metrics.Reference, source: str, feature_dim: int,
                    resolution: int, network: str) -> None:
  """ConfigError unless `reference` has `feature_dim`-d features of `resolution` px images."""
  dim = reference.mu.shape[0]
  if dim != feature_dim:
    raise ConfigError(f'{source} holds {dim}-d features but the {network} gives {feature_dim}-d '
                      'ones: compute reference statistics with the same network '
                      f'({REFERENCE_HINT})')
  saved = reference.info.get('resolution')
  if saved is None:
    logging.warning('%s does not record its image resolution: make sure it was computed from '
                    '%dx%d training images (%s writes the resolution)', source, resolution,
                    resolution, 'sagan_jax.reference_stats')
  elif int(saved) != resolution:
    raise ConfigError(f'{source} was computed at {saved}x{saved} px but the generator makes '
                      f'{resolution}x{resolution} images: compute reference statistics at '
                      f'{resolution} px ({REFERENCE_HINT} --config.data.resolution={resolution})')


def _frechet(fake: features.FeatureSet, reference: metrics.Reference) -> float:
  return metrics.frechet_distance(*fake.stats.statistics(), reference.mu, reference.sigma)


def _needs_real_features(reference: metrics.Reference) -> Optional[str]:
  if reference.features is None or len(reference.features) < 2:
    return 'the reference file holds no real features (write it with sagan_jax.reference_stats)'
  return None


Scores = Dict[str, float]


def compute_scores(metric_names: Sequence[str], sets: Dict[str, features.FeatureSet],
                   labels: np.ndarray, references: Dict[str, metrics.Reference]
                   ) -> Tuple[Scores, Dict[str, str]]:
  """Scores of the metrics whose inputs are there; returns (scores, {metric: why skipped})."""
  scores, skipped = {}, {}
  for name in metric_names:
    net = METRICS[name]
    fake, reference = sets.get(net), references.get(net)
    if name == 'is':
      scores['is'], scores['is_std'] = metrics.inception_score(fake.logits())
    elif name == 'class_accuracy':
      scores[name] = float(np.mean(np.argmax(fake.logits(), axis=1) == labels))
    elif name in ('fid', 'fd_classifier'):
      scores[name] = _frechet(fake, reference)
    else:
      reason = _needs_real_features(reference)
      if reason:
        skipped[name] = reason
        continue
      real, generated = reference.features, fake.stats.kept()
      if name == 'kid':
        scores['kid'], scores['kid_std'] = metrics.kernel_inception_distance(real, generated)
      else:
        count = min(len(real), len(generated))  # The same number of samples from each side.
        scores['precision'], scores['recall'] = metrics.precision_recall(real[:count],
                                                                         generated[:count])
  return scores, skipped


# ----------------------------------------------------------------------------------------------
# The evaluator: settings, feature networks and references, compiled once, called many times.


@dataclasses.dataclass
class Settings:
  """What to evaluate and how (config.eval, overridden by the CLI's flags)."""
  metrics: Tuple[str, ...] = tuple(METRICS)
  num_samples: int = 50_000
  batch_size: int = 256
  truncation: float = 0.0
  standing_stats: int = 0
  inception_path: Optional[str] = None
  reference_stats: Optional[str] = None
  classifier_path: Optional[str] = None
  seed: int = 0


def settings_from_config(config, **overrides) -> Settings:
  """Settings from `config.eval` (fields a saved config lacks keep their defaults) + overrides."""
  eval_config = config.get('eval') or {}
  fields = {f.name for f in dataclasses.fields(Settings)}
  values = {k: v for k, v in eval_config.items() if k in fields and v is not None}
  values.update({k: v for k, v in overrides.items() if v is not None})
  values['metrics'] = tuple(values.get('metrics', Settings.metrics))
  return Settings(**values)


def check_settings(settings: Settings) -> None:
  unknown = [m for m in settings.metrics if m not in METRICS]
  if unknown:
    raise ConfigError(f'unknown metric {unknown[0]!r}: choose eval.metrics (--metrics) among '
                      f'{", ".join(METRICS)}')
  for field in ('num_samples', 'batch_size'):
    if getattr(settings, field) < 1:
      raise ConfigError(f'{field}={getattr(settings, field)}: use a positive number')
  for field in ('truncation', 'standing_stats'):
    if getattr(settings, field) < 0:
      raise ConfigError(f'{field}={getattr(settings, field)}: use 0 (off) or a positive value')


def _load_classifier(settings: Settings, workdir, config):
  """The classifier FeatureNet and its reference, or (None, None) with the reason logged."""
  from sagan_jax import classifier  # pylint: disable=g-import-not-at-top  (imports evaluation)
  path = settings.classifier_path
  if not path and workdir is not None and (epath.Path(workdir) / CLASSIFIER_FILE).exists():
    path = str(epath.Path(workdir) / CLASSIFIER_FILE)
  if not path:
    logging.warning('No classifier (eval.classifier_path, --classifier or WORKDIR/%s): '
                    'fd_classifier and class_accuracy are skipped; train one with `python -m '
                    'sagan_jax.classifier --config=<the training config> --out=PATH`',
                    CLASSIFIER_FILE)
    return None, None
  net, reference = classifier.load_feature_net(path)
  classifier.check_compatible(net, config, path)
  return net, reference._replace(info={'path': str(path), **reference.info})


def _load_inception(settings: Settings, config):
  """The Inception FeatureNet and the reference (or None), with reasons for what is missing."""
  variables = inception.load_inception_or_none(settings.inception_path)
  if variables is None:
    return None, None
  net = features.inception_net(variables, inception.inception_weights_path(settings.inception_path))
  if not any(m in settings.metrics for m in ('fid', 'kid', 'precision_recall')):
    return net, None
  if not settings.reference_stats:
    logging.warning('No reference statistics (eval.reference_stats or --reference_stats): FID, '
                    'KID and precision/recall are skipped; compute them with `%s`', REFERENCE_HINT)
    return net, None
  reference = metrics.load_reference(settings.reference_stats)
  check_reference(reference, settings.reference_stats, net.feature_dim, config.data.resolution,
                  'FID Inception')
  return net, reference._replace(info={'path': settings.reference_stats, **reference.info})


class Evaluator:
  """Scores generator parameters with the configured metrics; compiled once, called repeatedly.

  Build it with `create_evaluator`. Calling it returns the scores (a dict of floats); `skipped`
  says which requested metrics cannot run and why, `describe()` what was used.
  """

  def __init__(self, generator, z_dim: int, mesh, settings: Settings,
               nets: Sequence[features.FeatureNet], references: Dict[str, metrics.Reference],
               skipped: Dict[str, str]):
    self.settings, self.nets, self.references = settings, list(nets), references
    self.skipped = dict(skipped)
    self.metric_names = [m for m in settings.metrics if m not in skipped]
    self._check_sample_counts()
    self._sample_fn = features.create_sample_features_fn(generator, z_dim, self.nets, mesh,
                                                         settings.batch_size, settings.truncation)
    self._standing_fn = None
    if settings.standing_stats:
      self._standing_fn = features.create_standing_stats_fn(
          generator, z_dim, mesh, settings.batch_size, settings.truncation)

  def _check_sample_counts(self) -> None:
    num = self.settings.num_samples
    for name in self.metric_names:
      net = next(n for n in self.nets if n.name == METRICS[name])
      if name in ('fid', 'fd_classifier') and num <= net.feature_dim:
        raise ConfigError(f'{num} samples of {net.feature_dim}-d {net.name} features give a '
                          f'singular covariance: {name} needs more samples than features; set '
                          f'--num_samples (eval.num_samples) to at least {net.feature_dim + 1} '
                          '(50,000 is the standard for FID)')
      if name == 'is' and num < 10:
        raise ConfigError(f'the Inception Score uses 10 splits: set --num_samples '
                          f'(eval.num_samples) to at least 10, not {num}')

  @property
  def enabled(self) -> bool:
    return bool(self.metric_names)

  def __call__(self, g_params, g_state) -> Dict[str, float]:
    settings = self.settings
    rng = jax.random.PRNGKey(settings.seed)
    if self._standing_fn is not None:
      g_state = features.standing_statistics(self._standing_fn, g_params, g_state,
                                             settings.standing_stats, jax.random.fold_in(rng, 1))
    # Real features for KID and precision/recall; logits for IS and class_accuracy only.
    keep = metrics.REFERENCE_FEATURES_KEPT if {'kid', 'precision_recall'} & set(
        self.metric_names) else 0
    with_logits = {METRICS[m] for m in ('is', 'class_accuracy') if m in self.metric_names}
    sets, labels = features.sample_features(
        self._sample_fn, g_params, g_state, settings.num_samples, settings.batch_size,
        jax.random.fold_in(rng, 0), keep, {net.name: net.name in with_logits for net in self.nets})
    scores, skipped = compute_scores(self.metric_names, sets, labels, self.references)
    for name, reason in skipped.items():
      logging.warning('%s skipped: %s', name, reason)
    self.skipped.update(skipped)
    return scores

  def describe(self) -> Dict[str, Any]:
    """The settings, networks and references of the scores (for the JSON file)."""
    settings = dataclasses.asdict(self.settings)
    return {'settings': settings, 'feature_networks': {n.name: n.description for n in self.nets},
            'references': {name: ref.info for name, ref in self.references.items()},
            'skipped': self.skipped}


def create_evaluator(config, generator, mesh, settings: Settings,
                     workdir: Optional[epath.PathLike] = None) -> Evaluator:
  """Loads the feature networks and references `settings` asks for and compiles the sampler.

  Missing Inception weights, reference statistics or classifier each skip their metrics with one
  log line; unusable files raise ConfigError.
  """
  check_settings(settings)
  nets, references, skipped = [], {}, {}
  wanted = {METRICS[m] for m in settings.metrics}
  if 'inception' in wanted:
    net, reference = _load_inception(settings, config)
    if net is None:
      skipped.update({m: 'no Inception weights' for m in settings.metrics
                      if METRICS[m] == 'inception'})
    else:
      nets.append(net)
      if reference is not None:
        references['inception'] = reference
      skipped.update({m: 'no reference statistics' for m in ('fid', 'kid', 'precision_recall')
                      if m in settings.metrics and reference is None})
  if 'classifier' in wanted:
    net, reference = _load_classifier(settings, workdir, config)
    if net is None:
      skipped.update({m: 'no classifier' for m in settings.metrics
                      if METRICS[m] == 'classifier'})
    else:
      nets.append(net)
      references['classifier'] = reference
  return Evaluator(generator, config.model.z_dim, mesh, settings, nets, references, skipped)


def format_scores(scores: Dict[str, float]) -> str:
  return '  '.join(f'{k}={v:.6g}' for k, v in scores.items())


def check_best_metric(metric: str) -> None:
  """ConfigError unless `metric` is a score that ranks checkpoints."""
  if SCORES.get(metric) is None:
    choices = ', '.join(k for k, v in SCORES.items() if v is not None)
    raise ConfigError(f'eval.best_metric={metric!r} cannot rank checkpoints: choose one of '
                      f'{choices}, or an empty string for no best checkpoint')


class BestCheckpoint:
  """Keeps WORKDIR/best: G of the evaluated step with the best `metric` score so far.

  'fid', 'kid' and 'fd_classifier' are better lower; 'is', 'precision', 'recall' and
  'class_accuracy' higher. A kept checkpoint chosen by another metric is replaced by the next
  evaluation. With several processes, process 0's decision holds for all.
  """

  def __init__(self, workdir: epath.PathLike, metric: str):
    check_best_metric(metric)
    self.metric, self.lower_is_better = metric, SCORES[metric]
    self.manager = checkpointing.create_best_manager(workdir)
    self.best = checkpointing.read_best(self.manager)

  def is_better(self, value: float) -> bool:
    if not np.isfinite(value):
      return False
    if self.best is None or self.best.get('metric') != self.metric:
      return True
    return value < self.best['value'] if self.lower_is_better else value > self.best['value']

  def update(self, state, config, scores: Dict[str, float]) -> bool:
    """Saves G of `state` when `scores` beat the kept one; True when it did (all processes)."""
    if self.metric not in scores:
      return False
    better = self.is_better(scores[self.metric])
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      better = bool(multihost_utils.broadcast_one_to_all(np.int32(better)))
    if better:
      step = int(state.step)
      metadata = {'step': step, 'metric': self.metric, 'value': float(scores[self.metric]),
                  'scores': {k: float(v) for k, v in scores.items()}}
      checkpointing.save_best(self.manager, state, config, metadata)
      self.best = metadata
      logging.info('New best checkpoint: %s=%.6g at step %d (%s)', self.metric,
                   scores[self.metric], step, self.manager.directory)
    return better
