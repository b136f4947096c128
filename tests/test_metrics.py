"""FID, IS, KID and precision/recall against closed forms and direct numpy formulas."""

import numpy as np
import pytest

from sagan_jax import metrics
from sagan_jax.errors import ConfigError


def random_spd(rng, dim):
  a = rng.standard_normal((dim, dim))
  return a @ a.T / dim + 0.1 * np.eye(dim)


def test_fid_of_identical_statistics_is_zero():
  rng = np.random.default_rng(0)
  mu, sigma = rng.standard_normal(16), random_spd(rng, 16)
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_fid_of_diagonal_covariances_is_closed_form():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
  var1, var2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
  expected = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(var1) - np.sqrt(var2))**2)
  np.testing.assert_allclose(metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)),
                             expected, rtol=1e-10)


def test_fid_from_features_matches_statistics_and_they_round_trip(tmp_path):
  rng = np.random.default_rng(2)
  real = rng.standard_normal((400, 6))
  fake = 1.5 * rng.standard_normal((300, 6)) + 0.3
  mu, sigma = metrics.feature_statistics(real)
  np.testing.assert_allclose(mu, real.mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(real.T, ddof=1), rtol=1e-12)
  path = str(tmp_path / 'stats.npz')
  metrics.save_statistics(path, mu, sigma)
  loaded_mu, loaded_sigma = metrics.load_statistics(path)
  np.testing.assert_array_equal(loaded_mu, mu)
  np.testing.assert_array_equal(loaded_sigma, sigma)
  expected = metrics.frechet_distance(mu, sigma, *metrics.feature_statistics(fake))
  assert metrics.fid_from_features(real, fake) == pytest.approx(expected, rel=1e-12)
  assert expected > 0.5


def test_fid_retries_a_non_finite_sqrtm_with_a_ridge(monkeypatch):
  real_sqrtm, calls = metrics.scipy.linalg.sqrtm, []

  def flaky_sqrtm(matrix):
    calls.append(matrix)
    return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

  monkeypatch.setattr(metrics.scipy.linalg, 'sqrtm', flaky_sqrtm)
  sigma = np.diag([1.0, 4.0])
  fid = metrics.frechet_distance(np.zeros(2), sigma, np.zeros(2), sigma, eps=1e-3)
  np.testing.assert_allclose(calls[1], (sigma + 1e-3 * np.eye(2)) @ (sigma + 1e-3 * np.eye(2)))
  # sqrtm((S + eI)^2) = S + eI, so the ridge costs Tr(S1 + S2) - 2 Tr(S + eI) = -2 e D.
  assert fid == pytest.approx(-2 * 1e-3 * 2, abs=1e-12)

  monkeypatch.setattr(metrics.scipy.linalg, 'sqrtm', lambda m: m + 0.5j)
  with pytest.raises(ValueError, match='imaginary part of 0.5'):
    metrics.frechet_distance(np.zeros(2), sigma, np.zeros(2), sigma)


def test_fid_bad_input_raises_config_error(tmp_path):
  rng = np.random.default_rng(3)
  with pytest.raises(ConfigError, match=r'FID needs more samples than feature dimensions \(at '
                                        r'least 33'):
    metrics.feature_statistics(rng.standard_normal((32, 32)))
  with pytest.raises(ConfigError, match=r'different feature sizes \(4 and 3\)'):
    metrics.frechet_distance(np.zeros(4), np.eye(4), np.zeros(3), np.eye(3))
  with pytest.raises(ConfigError, match='different feature sizes'):
    metrics.fid_from_features(rng.standard_normal((10, 4)), rng.standard_normal((10, 3)))
  with pytest.raises(ConfigError, match='not found'):
    metrics.load_statistics(str(tmp_path / 'absent.npz'))
  other = str(tmp_path / 'other.npz')
  np.savez(other, images=np.zeros(3))
  with pytest.raises(ConfigError, match="no mu and sigma arrays .*'images'"):
    metrics.load_statistics(other)


def test_inception_score_closed_forms():
  # Every sample equally unsure: p(y|x) = p(y), KL 0, IS 1.
  assert metrics.inception_score(np.full((50, 1008), 3.0)) == pytest.approx((1.0, 0.0), abs=1e-12)
  # Confident and spread evenly over 7 classes in every split: IS = 7 (the most 7 classes allow).
  num_classes = 7
  labels = np.arange(10 * 3 * num_classes) % num_classes
  logits = 100.0 * np.eye(num_classes)[labels]
  mean, std = metrics.inception_score(logits, num_splits=10)
  assert mean == pytest.approx(num_classes, rel=1e-9) and std < 1e-9


def test_inception_score_matches_a_direct_formula():
  rng = np.random.default_rng(4)
  logits = rng.standard_normal((40, 5)) * 2
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = [np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0))), 1)))
            for q in np.split(p, 4)]
  np.testing.assert_allclose(metrics.inception_score(logits, num_splits=4),
                             (np.mean(scores), np.std(scores)), rtol=1e-12)
  with pytest.raises(ConfigError, match='at least num_splits=10'):
    metrics.inception_score(logits[:9])


def direct_unbiased_mmd2(x, y):
  d = x.shape[1]
  k = lambda a, b: (np.dot(a, b) / d + 1)**3
  m = len(x)
  within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  across = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  return within / (m * (m - 1)) - 2 * across / m**2


def test_kid_matches_the_unbiased_mmd_formula():
  rng = np.random.default_rng(5)
  x, y = rng.standard_normal((12, 3)), rng.standard_normal((12, 3)) + 0.5
  # One subset of all samples: a permutation, to which MMD is blind.
  mean, std = metrics.kernel_inception_distance(x, y, num_subsets=1, subset_size=100)
  assert mean == pytest.approx(direct_unbiased_mmd2(x, y), rel=1e-12) and std == 0


def test_kid_is_unbiased_for_one_distribution_and_positive_for_two():
  rng = np.random.default_rng(6)
  same, biased = [], []
  for seed in range(40):
    x, y = rng.standard_normal((60, 8)), rng.standard_normal((60, 8))
    same.append(metrics.kernel_inception_distance(x, y, num_subsets=4, subset_size=30,
                                                  seed=seed)[0])
    k = lambda a, b: (a @ b.T / 8 + 1)**3
    biased.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())  # Diagonals kept.
  standard_error = np.std(same) / np.sqrt(len(same))
  assert abs(np.mean(same)) < 3 * standard_error
  assert np.mean(biased) > 10 * standard_error  # What keeping the diagonal would have cost.
  shifted = metrics.kernel_inception_distance(rng.standard_normal((60, 8)),
                                              rng.standard_normal((60, 8)) + 1.0,
                                              num_subsets=10, subset_size=30)
  assert shifted[0] > 10 * standard_error
  with pytest.raises(ConfigError, match='different feature sizes'):
    metrics.kernel_inception_distance(np.zeros((5, 2)), np.zeros((5, 3)))


def test_precision_recall_closed_forms():
  rng = np.random.default_rng(7)
  x = rng.standard_normal((50, 4))
  assert metrics.precision_recall(x, x.copy(), batch_size=7) == (1.0, 1.0)
  assert metrics.precision_recall(x, x + 100.0) == (0.0, 0.0)
  # One dimension, k = 1. Real radii: 0->1, 1->1, 2->1, 10->8; fake radii: 0.5->2.4, 2.9->2.4,
  # 20->1, 21->1. Fakes 0.5 and 2.9 are inside real balls, 20 and 21 are not: precision 1/2.
  # Reals 0, 1 and 2 are inside fake balls, 10 is not: recall 3/4.
  real = np.array([[0.0], [1.0], [2.0], [10.0]])
  fake = np.array([[0.5], [2.9], [20.0], [21.0]])
  assert metrics.precision_recall(real, fake, k=1, batch_size=3) == (0.5, 0.75)
  with pytest.raises(ConfigError, match='more than 3 samples'):
    metrics.precision_recall(real[:3], fake)
