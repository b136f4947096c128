"""Per-class figures: class_accuracy's table, intra_fd_classifier, their skips and reports, names.

Hand-made logits, labels and features on the host (no compiles): the numbers are exact or within
float64 rounding bounds derived below.
"""

import os

import numpy as np
import pytest

from sagan_jax import classifier as classifier_tool
from sagan_jax import data_sources
from sagan_jax.evaluation import classifier
from sagan_jax.evaluation import evaluator
from sagan_jax.evaluation import features
from sagan_jax.evaluation import metrics
from sagan_jax.evaluation import per_class
from tests.conftest import tiny_config
from tests import tolerances
from tests.tolerances import EPS64

NAMES = ['tee', 'shirt', 'coat', 'bag']
CEILINGS = [0.9, 0.5, 0.8, 0.7]
# Class 0: 3 of 4 right, once taken for 1; class 1: 1 of 5 right, 3 times taken for 2 (and once
# for 0); class 2: both right; class 3: no samples (4 logits, labels 0..2).
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2])
PREDICTED = np.array([0, 0, 1, 0, 2, 2, 0, 1, 2, 2, 2])


def _fake_set(labels, predicted, num_classes=4, dim=3, by_class=False, seed=0):
  fake = features.FeatureSet(keep=0, by_class=by_class)
  feats = np.random.default_rng(seed).standard_normal((len(labels), dim))
  fake.update({'features': feats, 'logits': 5.0 * np.eye(num_classes)[predicted]}, labels)
  return fake


def _class_accuracy(network_info):
  results = evaluator.evaluate_metrics(['class_accuracy'], {'classifier': _fake_set(
      LABELS, PREDICTED)}, LABELS, {}, {'classifier': network_info})
  assert results.skipped == {}
  return results.scores, results.details['class_accuracy']


def test_class_accuracy_per_class_names_the_worst_class_and_what_it_is_taken_for():
  scores, details = _class_accuracy({'class_names': NAMES, 'heldout_per_class_accuracy': CEILINGS})
  assert scores == {'class_accuracy': 6 / 11, 'worst_class_accuracy': 1 / 5}
  rows = details['classes']
  assert [r['samples'] for r in rows] == [4, 5, 2, 0]
  assert [r['accuracy'] for r in rows] == [3 / 4, 1 / 5, 1.0, None]
  assert [r['taken_for'] for r in rows] == [1, 2, None, None]
  assert [r['taken_for_share'] for r in rows] == [1 / 4, 3 / 5, None, None]
  assert [r['ratio'] for r in rows] == [(3 / 4) / 0.9, (1 / 5) / 0.5, 1.0 / 0.8, None]
  assert details['worst'] == rows[1] and details['min_ratio'] == (1 / 5) / 0.5
  assert rows[1]['name'] == 'shirt' and rows[1]['taken_for_name'] == 'coat'
  assert rows[1]['heldout_accuracy'] == 0.5 and details['heldout_missing'] is None
  assert per_class.worst_class_summary(details) == (
      'worst class 1 shirt: 0.20 (held-out 0.50), taken for coat 60%')
  # TensorBoard: the classes with samples, tags made of index and name.
  assert per_class.class_accuracy_scalars(details, 'eval/class_accuracy') == {
      'eval/class_accuracy/0_tee': 0.75, 'eval/class_accuracy/1_shirt': 0.2,
      'eval/class_accuracy/2_coat': 1.0}
  odd = {'classes': [dict(rows[0], name='T-shirt/top')]}
  assert list(per_class.class_accuracy_scalars(odd, 'x')) == ['x/0_T_shirt_top']


def test_class_accuracy_of_an_old_classifier_file_has_no_ceilings_and_says_how_to_get_them():
  scores, details = _class_accuracy({'num_classes': 4})  # Metadata without the new fields.
  assert scores['worst_class_accuracy'] == 1 / 5
  assert details['min_ratio'] is None and details['classes'][1]['name'] is None
  assert all(r['heldout_accuracy'] is None and r['ratio'] is None for r in details['classes'])
  assert 'retraining the classifier' in details['heldout_missing']
  assert per_class.worst_class_summary(details) == 'worst class 1: 0.20, taken for class 2 60%'
  no_split = _class_accuracy({'heldout_per_class_accuracy': None})[1]['heldout_missing']
  assert 'no held-out split' in no_split


def test_ties_pick_the_lowest_class():
  details = per_class.class_accuracy_table(np.array([1, 2, 0, 0]), np.array([0, 0, 1, 1]), 3)
  # Class 0 is taken for 1 and 2 once each, and both classes are at 0.
  assert details['worst']['class'] == 0 and details['worst']['taken_for'] == 1


def _class_features(rng, labels, dim):
  """Small integers: sums, means over 4 or 8 rows and centred products are exact in float64."""
  return rng.integers(-8, 9, (len(labels), dim)).astype(np.float64)


def _reference(rng, num_classes, per_class_count, dim):
  labels = np.repeat(np.arange(num_classes), per_class_count)
  stats = per_class.ClassStatistics()
  stats.update(_class_features(rng, labels, dim), labels)
  classes = stats.reference(num_classes, dim)
  return metrics.Reference(np.zeros(dim), np.eye(dim), None, {}, classes)


def test_intra_fd_is_the_mean_of_the_per_class_frechet_distances():
  rng = np.random.default_rng(3)
  num_classes, dim = 2, 3
  labels = np.tile([0, 1], 8)  # 8 samples of each class, in 2 batches of 4 per class.
  feats = _class_features(rng, labels, dim)
  fake = features.FeatureSet(keep=0, keep_logits=False, by_class=True)
  for half in (slice(0, 8), slice(8, 16)):
    fake.update({'features': feats[half]}, labels[half])
  # Means of 4 and 8 integers, the batches' merge (delta * 1/2, outer * 2) and the scatter of
  # dyadic values are exact; only sigma's division by N - 1 differs from np.cov's product with
  # 1 / (N - 1): 1 rounding against 2, within 1.5 EPS64 of the value.
  for c in range(num_classes):
    mu, sigma = fake.class_stats.by_class[c].statistics()
    assert np.array_equal(mu, feats[labels == c].mean(0))
    expected = np.cov(feats[labels == c].T)
    np.testing.assert_allclose(sigma, expected, rtol=0, atol=1.5 * EPS64 * np.abs(expected).max())
  reference = _reference(rng, num_classes, 8, dim)
  results = evaluator.evaluate_metrics(['intra_fd_classifier'], {'classifier': fake}, labels,
                                       {'classifier': reference},
                                       {'classifier': {'class_names': ['a', 'b']}})
  per_class_fd = [metrics.frechet_distance(*fake.class_stats.by_class[c].statistics(),
                                           reference.classes.mu[c], reference.classes.sigma[c])
                  for c in range(num_classes)]
  assert results.skipped == {} and all(fd > 0 for fd in per_class_fd)
  assert results.scores == {'intra_fd_classifier': float(np.mean(per_class_fd))}
  rows = results.details['intra_fd_classifier']['classes']
  assert [(r['class'], r['name'], r['samples'], r['real_images'], r['intra_fd']) for r in rows] == [
      (0, 'a', 8, 8, per_class_fd[0]), (1, 'b', 8, 8, per_class_fd[1])]
  # The evaluate tool's table merges it with class_accuracy's rows.
  accuracy = {'classes': [{'class': 0, 'name': 'a', 'accuracy': 0.5}]}
  merged = per_class.merge({'class_accuracy': accuracy,
                            'intra_fd_classifier': results.details['intra_fd_classifier']})
  assert merged == [{'class': 0, 'name': 'a', 'accuracy': 0.5, 'intra_fd': per_class_fd[0]},
                    {'class': 1, 'name': 'b', 'intra_fd': per_class_fd[1]}]
  lines = per_class.format_table(merged)
  assert len(lines) == 3 and 'intra-FD' in lines[0] and lines[2].split()[:3] == ['1', 'b', '-']


def test_intra_fd_is_skipped_with_the_fix_when_a_class_has_too_few_samples_or_no_reference():
  rng = np.random.default_rng(4)
  num_classes, dim = 2, 3
  labels = np.array([0] * 5 + [1] * 3)  # Class 1: 3 samples of 3-d features.
  fake = features.FeatureSet(keep=0, by_class=True)
  fake.update({'features': _class_features(rng, labels, dim),
               'logits': np.eye(num_classes)[labels]}, labels)
  reference = _reference(rng, num_classes, 8, dim)
  # The other metrics still run.
  results = evaluator.evaluate_metrics(['intra_fd_classifier', 'class_accuracy'],
                                       {'classifier': fake}, labels, {'classifier': reference})
  assert set(results.scores) == {'class_accuracy', 'worst_class_accuracy'}
  reason = results.skipped['intra_fd_classifier']
  assert 'class 1 has 3 samples' in reason and '--num_samples' in reason
  assert f'at least K*(D+1) = {num_classes * (dim + 1)}' in reason
  # A class with too few real images in the classifier file.
  few = _reference(rng, num_classes, 3, dim)
  reason = evaluator.compute_scores(['intra_fd_classifier'], {'classifier': fake}, labels,
                                    {'classifier': few})[1]['intra_fd_classifier']
  assert 'holds 3 real images of class 0' in reason and '--num_reference_images' in reason
  # A classifier file without per-class statistics (older, or over 100 classes).
  old = reference._replace(classes=None)
  reason = evaluator.compute_scores(['intra_fd_classifier'], {'classifier': fake}, labels,
                                    {'classifier': old})[1]['intra_fd_classifier']
  assert 'no per-class statistics' in reason and 'retrain the classifier' in reason
  # ImageNet's 1000 classes: none are written, and retraining would not help (no error either).
  results = evaluator.evaluate_metrics(['intra_fd_classifier'], {'classifier': fake}, labels,
                                       {'classifier': old}, {'classifier': {'num_classes': 1000}})
  assert results.skipped['intra_fd_classifier'] == (
      '1000 classes: per-class statistics of real images are kept for at most 100 (their size)')


def test_class_reference_arrays_have_zeros_for_a_class_without_images():
  stats = per_class.ClassStatistics()
  stats.update(np.array([[1.0, 2.0], [3.0, 6.0]]), np.array([2, 2]))
  classes = stats.reference(3, 2)
  assert classes.count.tolist() == [0, 0, 2] and not classes.mu[:2].any()
  assert classes.mu[2].tolist() == [2.0, 4.0]
  assert classes.sigma[2].tolist() == [[2.0, 4.0], [4.0, 8.0]]


def test_class_names_of_fashion_mnist_cifar10_and_a_folder(tmp_path):
  config = tiny_config()
  assert data_sources.class_names(config.data)[6] == 'Shirt'
  assert len(data_sources.class_names(config.data)) == 10
  config.data.name = 'cifar10'
  assert data_sources.class_names(config.data)[:2] == ['airplane', 'automobile']
  for name in ('dog', 'cat'):
    os.makedirs(tmp_path / 'train' / name)
    (tmp_path / 'train' / name / 'a.png').write_bytes(b'')  # Listed, not read.
  config.data.name, config.data.folder_dir, config.data.split = 'folder', str(tmp_path), 'train'
  assert data_sources.class_names(config.data) == ['cat', 'dog']
  config.data.folder_dir = str(tmp_path / 'missing')  # Unreadable: no names, no error.
  assert data_sources.class_names(config.data) is None


class _Batches(list):
  """What the classifier tool's reference pass reads: batches and the images' count."""
  num_examples = 12


@pytest.mark.parametrize('num_classes', [100, 101])
def test_the_classifier_tool_keeps_per_class_statistics_for_at_most_100_classes(num_classes):
  rng = np.random.default_rng(5)
  batches = _Batches({'image': rng.standard_normal((6, 2)), 'label': np.arange(6) % 2}
                     for _ in range(2))
  config = tiny_config()
  config.data.num_classes = num_classes
  reference = classifier_tool.real_reference(
      lambda images: {'classifier': {'features': images}}, batches, config.data, 2)
  feats = np.concatenate([b['image'] for b in batches])
  assert reference.info['num_images'] == 12 and reference.features.shape == (12, 2)
  if num_classes > classifier.MAX_CLASS_REFERENCE:
    assert reference.classes is None
    return
  assert reference.classes.mu.shape == (100, 2) and reference.classes.sigma.shape == (100, 2, 2)
  assert reference.classes.count[:3].tolist() == [6, 6, 0]
  # Two batches of 3 rows per class, merged, against numpy on the 6 rows: each side takes fewer
  # than 8 roundings per mean and 16 per covariance term, whose terms are products of centred
  # values, each at most 2 max |x| (so |c_i c_j| <= 4 |x|_max^2).
  rows = feats[1::2]
  largest = np.abs(rows).max()
  tolerances.assert_within(reference.classes.mu[1], rows.mean(0),
                           2 * tolerances.gamma(8, EPS64) * largest, 'class mu')
  tolerances.assert_within(reference.classes.sigma[1], np.cov(rows.T),
                           2 * tolerances.gamma(16, EPS64) * 4 * largest**2 * 6 / 5, 'class sigma')
