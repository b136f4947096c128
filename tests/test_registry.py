"""The metric registry: one entry makes a metric, from compute_scores to the best checkpoint."""

import numpy as np
import pytest
import scipy.special

from sagan_jax import checkpointing
from sagan_jax.errors import ConfigError
from sagan_jax.evaluation import evaluator
from sagan_jax.evaluation import features
from sagan_jax.evaluation import registry

BUILT_IN = ('fid', 'is', 'kid', 'precision_recall', 'fd_classifier', 'class_accuracy',
            'intra_fd_classifier')


def _confidence(inputs: registry.Inputs):
  top = scipy.special.softmax(inputs.fake.logits(), axis=1).max(axis=1)
  return {'confidence': float(top.mean()), 'confidence_std': float(top.std())}


@pytest.fixture
def confidence():
  """A metric added for the test (removed after it): the classifier's mean top probability."""
  metric = registry.register(registry.Metric(
      'confidence', 'classifier', frozenset({registry.Input.LOGITS}),
      {'confidence': registry.HIGHER, 'confidence_std': None}, _confidence))
  yield metric
  registry.unregister(metric.name)
  assert registry.metric_names() == BUILT_IN


def _fake_set(rng, num: int, dim: int, num_classes: int) -> features.FeatureSet:
  fake = features.FeatureSet(keep=0)
  fake.update({'features': rng.standard_normal((num, dim)),
               'logits': 3 * rng.standard_normal((num, num_classes))})
  return fake


def test_one_entry_makes_a_metric_that_is_scored_and_ranks_checkpoints(confidence, tmp_path):
  rng = np.random.default_rng(0)
  fake, labels = _fake_set(rng, 50, 8, 4), rng.integers(0, 4, 50)
  scores, skipped = evaluator.compute_scores(['confidence', 'class_accuracy'],
                                             {'classifier': fake}, labels, {})
  top = scipy.special.softmax(fake.logits(), axis=1).max(axis=1)
  assert skipped == {} and set(scores) == {'confidence', 'confidence_std', 'class_accuracy',
                                           'worst_class_accuracy'}
  assert scores['confidence'] == top.mean() and scores['confidence_std'] == top.std()
  assert scores['class_accuracy'] == np.mean(fake.logits().argmax(1) == labels)
  # eval.metrics accepts it (and runs it by default); eval.best_metric its ranking score alone.
  evaluator.check_settings(evaluator.Settings(metrics=('confidence',)))
  assert evaluator.Settings().metrics == BUILT_IN + ('confidence',)
  checkpointing.check_best_metric('confidence')
  with pytest.raises(ConfigError, match="'confidence_std' cannot rank checkpoints: choose one of "
                                        r'fid, .*, intra_fd_classifier, confidence, or'):
    checkpointing.check_best_metric('confidence_std')
  assert registry.metric_of_score('confidence_std') == 'confidence'
  keeper = checkpointing.BestCheckpoint(tmp_path, 'confidence')
  assert not keeper.lower_is_better and keeper.is_better(0.5)
  keeper.best = {'metric': 'confidence', 'value': 0.5}
  assert keeper.is_better(0.6) and not keeper.is_better(0.4)


def test_built_in_metrics_rank_as_before():
  assert registry.metric_names() == BUILT_IN
  # Lower is better (True), higher (False), or not a ranking score (None).
  expected = {'fid': True, 'is': False, 'is_std': None, 'kid': True, 'kid_std': None,
              'precision': False, 'recall': False, 'fd_classifier': True,
              'class_accuracy': False, 'worst_class_accuracy': False,
              'intra_fd_classifier': True}
  directions = {s: registry.score_direction(s) for s in expected}
  assert {s: d if d is None else d == registry.LOWER for s, d in directions.items()} == expected
  assert registry.ranking_scores() == tuple(s for s, d in expected.items() if d is not None)
  assert {m: registry.get(m).network for m in BUILT_IN} == {
      'fid': 'inception', 'is': 'inception', 'kid': 'inception',
      'precision_recall': 'inception', 'fd_classifier': 'classifier',
      'class_accuracy': 'classifier', 'intra_fd_classifier': 'classifier'}
  assert registry.metric_of_score('recall') == 'precision_recall'
  with pytest.raises(ConfigError, match="unknown metric 'fjd': choose eval.metrics"):
    registry.get('fjd')


def test_a_metric_cannot_take_a_name_or_a_score_twice_or_read_an_unknown_network(confidence):
  def metric(name, scores, network='classifier'):
    return registry.Metric(name, network, frozenset(), scores, _confidence)

  with pytest.raises(ValueError, match="named 'confidence' is registered already"):
    registry.register(metric('confidence', {'other': None}))
  with pytest.raises(ValueError, match="another metric writes the score 'fid'"):
    registry.register(metric('fid2', {'fid': registry.LOWER}))
  with pytest.raises(ValueError, match="unknown network 'dino'"):
    registry.register(metric('dino_fd', {'dino_fd': registry.LOWER}, 'dino'))
  with pytest.raises(ValueError, match="not 'smaller'"):
    registry.register(metric('odd', {'odd': 'smaller'}))
  assert registry.metric_names() == BUILT_IN + ('confidence',)


def test_a_metric_returning_other_scores_than_registered_is_an_error(confidence):
  fake = _fake_set(np.random.default_rng(1), 10, 4, 3)
  registry.unregister('confidence')
  registry.register(registry.Metric('confidence', 'classifier', frozenset({registry.Input.LOGITS}),
                                    {'confidence': registry.HIGHER}, _confidence))
  with pytest.raises(ValueError, match=r"returned the scores \['confidence', 'confidence_std'\]"):
    evaluator.compute_scores(['confidence'], {'classifier': fake}, None, {})


def test_kid_without_real_features_is_skipped_with_the_reason():
  fake = _fake_set(np.random.default_rng(2), 10, 4, 3)
  scores, skipped = evaluator.compute_scores(['kid'], {'inception': fake}, None, {})
  assert scores == {} and 'holds no real features' in skipped['kid']
