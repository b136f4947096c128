"""Scores a generator: Settings, the Evaluator (compiled once, called repeatedly), compute_scores.

Which metrics exist, the networks they read and what they need is the registry's
(sagan_jax.evaluation.registry); this module loads those networks and reference statistics, runs
the compiled, sharded sampling of sagan_jax.evaluation.features and hands each metric its inputs.
The metrics run on the host in float64 (sagan_jax.evaluation.metrics).

Feature networks (features.FeatureNet):
- 'inception': pytorch-fid's FID Inception-v3 (evaluation.inception, its weights
  evaluation.inception_weights). Its pool3 features give FID, KID and precision/recall against
  reference statistics of the training images (`python -m sagan_jax.reference_stats`), its logits
  the Inception Score.
- 'classifier': a small classifier trained on the data set itself (evaluation.classifier, trained
  by `python -m sagan_jax.classifier`), for data sets without Inception weights.
A metric whose network, weights or reference is missing is skipped with one log line that says
why; the others run. So is a metric whose inputs give no score (registry.Skip: e.g. too few
samples per class for intra_fd_classifier), logged once however often the evaluator runs. Besides
the scores, metrics may give details (registry.Result: e.g. class_accuracy's per-class table),
kept in `Evaluator.details` after each call.
"""

import dataclasses
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

from absl import logging
from etils import epath
import jax
import numpy as np

from sagan_jax.errors import ConfigError
from sagan_jax.evaluation import classifier
from sagan_jax.evaluation import features
from sagan_jax.evaluation import inception_weights
from sagan_jax.evaluation import metrics
from sagan_jax.evaluation import registry

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


def _missing_input(metric: registry.Metric, reference: Optional[metrics.Reference],
                   network_info: Dict[str, Any]) -> Optional[str]:
  """Why `reference` lacks what `metric` reads (real features, per-class statistics), or None;
  `network_info`: the network's description."""
  if registry.Input.REAL_FEATURES in metric.needs and (
      reference is None or reference.features is None or len(reference.features) < 2):
    return 'the reference file holds no real features (write it with sagan_jax.reference_stats)'
  if registry.Input.CLASS_REFERENCE in metric.needs and (
      reference is None or reference.classes is None):
    if network_info.get('num_classes', 0) > classifier.MAX_CLASS_REFERENCE:
      return (f"{network_info['num_classes']} classes: per-class statistics of real images are "
              f'kept for at most {classifier.MAX_CLASS_REFERENCE} (their size)')
    return (f'the {metric.network} file holds no per-class statistics of real images (it '
            f'predates them): retrain the classifier ({classifier.TRAIN_HINT}) to add them')
  return None


Scores = Dict[str, float]


class Results(NamedTuple):
  """What evaluate_metrics gives: scores, {metric: details} and {metric: why skipped}."""
  scores: Scores
  details: Dict[str, Any]
  skipped: Dict[str, str]


def evaluate_metrics(metric_names: Sequence[str], sets: Dict[str, features.FeatureSet],
                     labels: Optional[np.ndarray], references: Dict[str, metrics.Reference],
                     network_info: Optional[Dict[str, Dict[str, Any]]] = None) -> Results:
  """Runs the metrics whose inputs are there; a metric without them, or raising registry.Skip,
  is skipped with its reason.

  `sets`, `references` and `network_info` (FeatureNet descriptions) are by network name; each
  metric receives its network's (registry.Inputs).
  """
  results = Results({}, {}, {})
  for name in metric_names:
    metric = registry.get(name)
    reference = references.get(metric.network)
    info = (network_info or {}).get(metric.network, {})
    reason = _missing_input(metric, reference, info)
    if reason:
      results.skipped[name] = reason
      continue
    inputs = registry.Inputs(sets.get(metric.network), reference, labels, info)
    try:
      values = metric.compute(inputs)
    except registry.Skip as e:
      results.skipped[name] = str(e)
      continue
    if isinstance(values, registry.Result):
      values, results.details[name] = values
    if set(values) != set(metric.scores):
      raise ValueError(f'metric {name!r} returned the scores {sorted(values)}, not the '
                       f'{sorted(metric.scores)} it is registered with')
    results.scores.update(values)
  return results


def compute_scores(metric_names: Sequence[str], sets: Dict[str, features.FeatureSet],
                   labels: Optional[np.ndarray], references: Dict[str, metrics.Reference]
                   ) -> Tuple[Scores, Dict[str, str]]:
  """evaluate_metrics without details or network descriptions: (scores, {metric: why skipped})."""
  results = evaluate_metrics(metric_names, sets, labels, references)
  return results.scores, results.skipped


# ----------------------------------------------------------------------------------------------
# The evaluator: settings, feature networks and references, compiled once, called many times.


@dataclasses.dataclass
class Settings:
  """What to evaluate and how (config.eval, overridden by the CLI's flags)."""
  metrics: Tuple[str, ...] = dataclasses.field(default_factory=registry.metric_names)
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
  values['metrics'] = tuple(values.get('metrics', registry.metric_names()))
  return Settings(**values)


def check_settings(settings: Settings) -> None:
  for name in settings.metrics:
    registry.get(name)  # ConfigError naming the choices for an unknown one.
  for field in ('num_samples', 'batch_size'):
    if getattr(settings, field) < 1:
      raise ConfigError(f'{field}={getattr(settings, field)}: use a positive number')
  for field in ('truncation', 'standing_stats'):
    if getattr(settings, field) < 0:
      raise ConfigError(f'{field}={getattr(settings, field)}: use 0 (off) or a positive value')


class _Loaded(NamedTuple):
  """What a loader of a feature network found."""
  net: Optional[features.FeatureNet]  # None: no network file.
  reference: Optional[metrics.Reference] = None
  missing: Optional[str] = None  # Why the network's metrics are skipped, when `net` is None.


# The loaders: (settings, config, workdir, whether a requested metric of the network reads a
# reference) -> _Loaded.


def _load_classifier(settings: Settings, config, workdir, wants_reference: bool) -> _Loaded:
  """The classifier FeatureNet and its reference (in the same file), or why there is none."""
  del wants_reference  # The file holds it.
  path = settings.classifier_path
  if not path and workdir is not None and (epath.Path(workdir) / CLASSIFIER_FILE).exists():
    path = str(epath.Path(workdir) / CLASSIFIER_FILE)
  if not path:
    logging.warning('No classifier (eval.classifier_path, --classifier or WORKDIR/%s): '
                    'fd_classifier and class_accuracy are skipped; train one with `%s`',
                    CLASSIFIER_FILE, classifier.TRAIN_HINT)
    return _Loaded(None, missing='no classifier')
  net, reference = classifier.load_feature_net(path)
  classifier.check_compatible(net, config, path)
  return _Loaded(net, reference._replace(info={'path': str(path), **reference.info}))


def _load_inception(settings: Settings, config, workdir, wants_reference: bool) -> _Loaded:
  """The Inception FeatureNet and the reference (or None), with reasons for what is missing."""
  del workdir  # Unused.
  variables = inception_weights.load_inception_or_none(settings.inception_path)
  if variables is None:
    return _Loaded(None, missing='no Inception weights')
  net = features.inception_net(
      variables, inception_weights.inception_weights_path(settings.inception_path))
  if not wants_reference:
    return _Loaded(net)
  if not settings.reference_stats:
    logging.warning('No reference statistics (eval.reference_stats or --reference_stats): FID, '
                    'KID and precision/recall are skipped; compute them with `%s`', REFERENCE_HINT)
    return _Loaded(net)
  reference = metrics.load_reference(settings.reference_stats)
  check_reference(reference, settings.reference_stats, net.feature_dim, config.data.resolution,
                  'FID Inception')
  info = {'path': settings.reference_stats, **reference.info}
  return _Loaded(net, reference._replace(info=info))


_LOADERS = {'inception': _load_inception, 'classifier': _load_classifier}


class Evaluator:
  """Scores generator parameters with the configured metrics; compiled once, called repeatedly.

  Build it with `create_evaluator`. Calling it returns the scores (a dict of floats); `details`
  then holds the metrics' details of that call ({metric: details}), `skipped` says which requested
  metrics cannot run and why, `describe()` what was used.
  """

  def __init__(self, generator, z_dim: int, mesh, settings: Settings,
               nets: Sequence[features.FeatureNet], references: Dict[str, metrics.Reference],
               skipped: Dict[str, str]):
    self.settings, self.nets, self.references = settings, list(nets), references
    self.skipped = dict(skipped)
    self.details: Dict[str, Any] = {}
    self._logged = set()  # The metrics whose skipping at a call was logged.
    self.metric_names = [m for m in settings.metrics if m not in skipped]
    self._check_sample_counts()
    self._z_dim, self._mesh = z_dim, mesh
    self.set_generator(generator)

  def set_generator(self, generator) -> None:
    """Samples with `generator` from now on (progressive growing: each stage's G)."""
    settings, z_dim, mesh = self.settings, self._z_dim, self._mesh
    self._sample_fn = features.create_sample_features_fn(generator, z_dim, self.nets, mesh,
                                                         settings.batch_size, settings.truncation)
    self._standing_fn = None
    if settings.standing_stats:
      self._standing_fn = features.create_standing_stats_fn(
          generator, z_dim, mesh, settings.batch_size, settings.truncation)

  def _check_sample_counts(self) -> None:
    for name in self.metric_names:
      metric = registry.get(name)
      if metric.check_samples is not None:
        net = next(n for n in self.nets if n.name == metric.network)
        metric.check_samples(name, self.settings.num_samples, net)

  @property
  def enabled(self) -> bool:
    return bool(self.metric_names)

  def _needed(self, needed: registry.Input):
    """The requested metrics that read `needed`."""
    return [m for m in map(registry.get, self.metric_names) if needed in m.needs]

  def __call__(self, g_params, g_state, show_progress: bool = False) -> Dict[str, float]:
    """The scores of G's `g_params` and `g_state`; `show_progress`: progress lines of sampling
    (the evaluate tool; training's evaluations are short and log their scores only)."""
    settings = self.settings
    rng = jax.random.PRNGKey(settings.seed)
    if self._standing_fn is not None:
      g_state = features.standing_statistics(self._standing_fn, g_params, g_state,
                                             settings.standing_stats, jax.random.fold_in(rng, 1))
    # Fake feature rows (KID and precision/recall) and logits (IS, class_accuracy) only when read.
    keep = metrics.REFERENCE_FEATURES_KEPT if self._needed(registry.Input.FAKE_FEATURES) else 0
    with_logits = {m.network for m in self._needed(registry.Input.LOGITS)}
    sets, labels = features.sample_features(
        self._sample_fn, g_params, g_state, settings.num_samples, settings.batch_size,
        jax.random.fold_in(rng, 0), keep, {net.name: net.name in with_logits for net in self.nets},
        {m.network for m in self._needed(registry.Input.FAKE_CLASS_STATISTICS)},
        show_progress)
    results = evaluate_metrics(self.metric_names, sets, labels, self.references,
                               {net.name: net.description for net in self.nets})
    for name, reason in results.skipped.items():
      if name not in self._logged:  # Once: training evaluates again and again.
        logging.info('%s skipped: %s', name, reason)
        self._logged.add(name)
    self.skipped = {**{k: v for k, v in self.skipped.items() if k not in self.metric_names},
                    **results.skipped}
    self.details = results.details
    return results.scores

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
  requested = [registry.get(m) for m in settings.metrics]
  for network, load in _LOADERS.items():
    wanted = [m for m in requested if m.network == network]
    if not wanted:
      continue
    loaded = load(settings, config, workdir, any(m.needs_reference for m in wanted))
    if loaded.net is None:
      skipped.update({m.name: loaded.missing for m in wanted})
      continue
    nets.append(loaded.net)
    if loaded.reference is not None:
      references[network] = loaded.reference
    skipped.update({m.name: 'no reference statistics' for m in wanted
                    if m.needs_reference and loaded.reference is None})
    # Known before sampling: no per-class statistics of the samples are kept for nothing.
    for metric in wanted:
      if registry.Input.CLASS_REFERENCE in metric.needs and loaded.reference is not None:
        reason = _missing_input(metric, loaded.reference, loaded.net.description)
        if reason:
          logging.info('%s skipped: %s', metric.name, reason)
          skipped[metric.name] = reason
  return Evaluator(generator, config.model.z_dim, mesh, settings, nets, references, skipped)


def format_scores(scores: Dict[str, float]) -> str:
  return '  '.join(f'{k}={v:.6g}' for k, v in scores.items())
