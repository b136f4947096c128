"""FID, IS, KID and precision/recall against closed forms and direct numpy formulas."""

import numpy as np
import pytest

from sagan_jax.evaluation import metrics
from sagan_jax.errors import ConfigError
from tests.tolerances import EPS64


def gamma(n: int) -> float:
  """gamma_n in float64 (tests/tolerances.py): the worst-case relative error of n operations."""
  return n * EPS64 / 2 / (1 - n * EPS64 / 2)


def fid_rounding(mu1, sigma1, mu2, sigma2) -> float:
  """A float64 rounding bound of metrics.frechet_distance for symmetric positive sigma1 sigma2.

  sigma1 @ sigma2 is off by gamma_D |sigma1| |sigma2|. scipy's sqrtm (Schur method) returns X with
  X^2 = A + E, |E|_F <= gamma_(D^3) (|X|_F^2 + |A|_F) (the Schur form's backward error and the
  triangular square root's residual; Higham, Functions of Matrices, 6.2), which moves X by at most
  |E| / (2 sqrt(lambda_min(A))) and its trace by D times that. The final sum's rounding is
  gamma_(4 D) of its absolute terms.
  """
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  dim = sigma1.shape[0]
  product = sigma1 @ sigma2
  eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
  assert np.allclose(product, product.T, rtol=0, atol=1e-12 * np.abs(product).max())
  covmean_norm2 = np.sum(eigenvalues)  # |X|_F^2 = Tr(A) for the symmetric X = sqrt(A).
  product_error = gamma(dim) * np.linalg.norm(np.abs(sigma1) @ np.abs(sigma2))
  residual = gamma(dim**3) * (covmean_norm2 + np.linalg.norm(product))
  trace_error = dim * (product_error + residual) / (2 * np.sqrt(eigenvalues.min()))
  terms = (np.sum((np.asarray(mu1) - np.asarray(mu2))**2) + np.trace(np.abs(sigma1)) +
           np.trace(np.abs(sigma2)) + 2 * np.sum(np.sqrt(eigenvalues)))
  return 2 * trace_error + gamma(4 * dim + 2) * terms


def random_spd(rng, dim):
  a = rng.standard_normal((dim, dim))
  return a @ a.T / dim + 0.1 * np.eye(dim)


def test_fid_of_identical_statistics_is_zero():
  rng = np.random.default_rng(0)
  mu, sigma = rng.standard_normal(16), random_spd(rng, 16)
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) <= fid_rounding(mu, sigma, mu, sigma)


def test_fid_of_diagonal_covariances_is_closed_form():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
  var1, var2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
  expected = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(var1) - np.sqrt(var2))**2)
  np.testing.assert_allclose(metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)),
                             expected, rtol=0,
                             atol=fid_rounding(mu1, np.diag(var1), mu2, np.diag(var2)))


def test_fid_from_features_matches_statistics_and_they_round_trip(tmp_path):
  rng = np.random.default_rng(2)
  real = rng.standard_normal((400, 6))
  fake = 1.5 * rng.standard_normal((300, 6)) + 0.3
  mu, sigma = metrics.feature_statistics(real)
  # The same numpy calls on the same float64 array: equal to the last bit in practice.
  np.testing.assert_allclose(mu, real.mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(real.T, ddof=1), rtol=1e-12)
  path = str(tmp_path / 'stats.npz')
  metrics.save_statistics(path, mu, sigma)
  loaded_mu, loaded_sigma = metrics.load_statistics(path)
  np.testing.assert_array_equal(loaded_mu, mu)
  np.testing.assert_array_equal(loaded_sigma, sigma)
  expected = metrics.frechet_distance(mu, sigma, *metrics.feature_statistics(fake))
  assert metrics.fid_from_features(real, fake) == pytest.approx(expected, rel=1e-12)  # Same calls.
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
  ridged = sigma + 1e-3 * np.eye(2)
  assert abs(fid - -2 * 1e-3 * 2) <= fid_rounding(np.zeros(2), ridged, np.zeros(2), ridged) + gamma(
      2) * np.trace(ridged)  # The ridge's own rounding.

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


def is_split_rounding(logits, num_splits) -> np.ndarray:
  """A float64 rounding bound of each split's score exp(E KL(p(y|x) || p(y))), relative to it.

  log p = logits - logsumexp is off by at most gamma_(C+3) (2 max|logit| + log C) (C classes);
  p = exp(log p) and the split's mean p(y) carry that relative error plus gamma_(n+1); KL = sum
  p (log p - log p(y)) then errs by twice the log errors plus gamma_(C+2) of its absolute terms.
  """
  logits = np.asarray(logits, np.float64)
  num, classes = logits.shape
  log_p = logits - metrics.scipy.special.logsumexp(logits, axis=1, keepdims=True)
  p = np.exp(log_p)
  log_error = gamma(classes + 3) * (2 * np.abs(logits).max(1) + np.log(classes))
  bounds = []
  for part, part_p, part_error in zip(np.array_split(log_p, num_splits),
                                      np.array_split(p, num_splits),
                                      np.array_split(log_error, num_splits)):
    marginal_error = part_error.max() + gamma(len(part) + 1)
    abs_kl = np.sum(part_p * np.abs(part - np.log(part_p.mean(0))), axis=1)
    kl_error = 2 * (part_error + marginal_error) + gamma(classes + 2) * abs_kl
    bounds.append(kl_error.mean() + gamma(len(part) + 2))  # The mean over samples, then exp.
  return np.asarray(bounds)


def test_inception_score_closed_forms():
  # Every sample equally unsure: p(y|x) = p(y), KL 0, IS 1 (std 0) up to rounding.
  logits = np.full((50, 1008), 3.0)
  tolerance = 2 * is_split_rounding(logits, 10).max()
  assert metrics.inception_score(logits) == pytest.approx((1.0, 0.0), abs=tolerance)
  # Confident and spread evenly over 7 classes in every split: IS = 7 (the most 7 classes allow).
  num_classes = 7
  labels = np.arange(10 * 3 * num_classes) % num_classes
  logits = 100.0 * np.eye(num_classes)[labels]
  mean, std = metrics.inception_score(logits, num_splits=10)
  # exp(-100) of mass elsewhere moves KL from log 7 by about 600 exp(-100): nothing in float64.
  tolerance = 2 * is_split_rounding(logits, 10).max()
  assert mean == pytest.approx(num_classes, rel=tolerance) and std <= tolerance * num_classes


def test_inception_score_matches_a_direct_formula():
  rng = np.random.default_rng(4)
  logits = rng.standard_normal((40, 5)) * 2
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = [np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0))), 1)))
            for q in np.split(p, 4)]
  # Two float64 computations: each score within its bound of the exact one; the mean and the std
  # of 4 scores move by at most the largest score error (twice for the std), plus their rounding.
  score_error = 2 * np.max(is_split_rounding(logits, 4) * np.asarray(scores))
  mean, std = metrics.inception_score(logits, num_splits=4)
  assert abs(mean - np.mean(scores)) <= score_error + gamma(6) * np.mean(scores)
  assert abs(std - np.std(scores)) <= 2 * score_error + gamma(14) * np.mean(scores)
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
  # Matrix products against Python loops: other orders. Each kernel value (x.y / d + 1)^3 is off
  # by 3 (|x.y| / d + 1)^2 gamma_(d+1) |x| |y| / d + gamma_3 of it; the sums of m^2 such values
  # add gamma_(m^2) of their absolute terms. Twice that for two computations.
  d, m = x.shape[1], len(x)
  errors, scale = 0.0, 0.0
  for a, b, weight in ((x, x, 1 / (m * (m - 1))), (y, y, 1 / (m * (m - 1))), (x, y, 2 / m**2)):
    dots = a @ b.T
    values = np.abs(dots / d + 1)**3
    value_errors = (3 * (np.abs(dots) / d + 1)**2 * gamma(d + 1) * (np.abs(a) @ np.abs(b).T) / d +
                    gamma(3) * values)
    if a is b:  # The diagonal k(x_i, x_i) is left out.
      np.fill_diagonal(values, 0)
      np.fill_diagonal(value_errors, 0)
    errors += weight * np.sum(value_errors)
    scale += weight * np.sum(values)
  tolerance = 2 * (errors + gamma(m * m + 2) * scale)
  assert abs(mean - direct_unbiased_mmd2(x, y)) <= tolerance and std == 0


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
