"""FID, Inception Score, KID and precision/recall from Inception outputs, in float64 on the host.

Conventions are the field's (docs/recipe.md), so scores compare with published ones as long as the
features come from the same network and resizing (evaluation.inception: pytorch-fid's FID
Inception) and the reference statistics from the same data:
- FID (Heusel et al. 2017; pytorch-fid's `calculate_frechet_distance`): pool3 features, covariance
  with N - 1, `scipy.linalg.sqrtm` of the product, retried with 1e-6 I on both covariances when not
  finite, a negligible imaginary part dropped. Statistics files are .npz with `mu` and `sigma`.
- IS (Salimans et al. 2016): softmax over all 1008 logits, 10 consecutive splits, the mean and std
  of exp(E KL(p(y|x) || p(y))). The original code and torch-fidelity use the logits without the fc
  bias (FIDInceptionV3's 'logits_unbiased').
- KID (Binkowski et al. 2018; clean-fid, torch-fidelity): unbiased MMD^2 with the kernel
  (x.y / d + 1)^3 on 100 random subsets of 1000 (fewer when the sets are smaller); mean and std.
- Precision and recall (Kynkaanniemi et al. 2019): a sample is covered by a set when it lies within
  the distance of some member's k-th nearest neighbour (k = 3) in that set.
"""

import io
import json
from typing import Any, Dict, NamedTuple, Optional, Tuple
import warnings

from etils import epath
import numpy as np
import scipy.linalg
import scipy.special

from sagan_jax.errors import ConfigError

# Real features a reference file keeps for KID and precision/recall (a random subset: the input
# pipeline shuffles).
REFERENCE_FEATURES_KEPT = 10_000


def _features_2d(features, name: str) -> np.ndarray:
  features = np.asarray(features, np.float64)
  if features.ndim != 2:
    raise ConfigError(f'{name} must be a [num_samples, dim] array, got shape {features.shape}')
  return features


def _check_same_dim(a: np.ndarray, b: np.ndarray, what: str) -> None:
  if a.shape[1] != b.shape[1]:
    raise ConfigError(f'{what} have different feature sizes ({a.shape[1]} and {b.shape[1]}): '
                      'compute both with the same network and layer')


# ----------------------------------------------------------------------------------------------
# FID.


def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
  """Mean and covariance (N - 1 normalization) of [N, D] features, float64.

  Raises ConfigError when N <= D: the covariance is then singular and FID undefined.
  """
  features = _features_2d(features, 'FID features')
  check_enough_samples(*features.shape)
  return features.mean(axis=0), np.cov(features, rowvar=False)


def check_enough_samples(num: int, dim: int) -> None:
  """ConfigError unless `num` samples of `dim`-d features give a non-singular covariance."""
  if num <= dim:
    raise ConfigError(f'{num} samples of {dim}-d features give a singular covariance: FID needs '
                      f'more samples than feature dimensions (at least {dim + 1}; 50,000 is '
                      'the standard)')


class RunningStatistics:
  """Mean and covariance (N - 1) of features that arrive batch by batch, in float64.

  Batches are merged with Chan et al.'s pairwise update, so the result equals np.cov of all rows
  without holding them; the first `keep` rows are kept (for KID and precision/recall).
  """

  def __init__(self, keep: int = 0):
    self.count, self.keep = 0, keep
    self._mean, self._m2, self._kept = None, None, []

  def update(self, batch) -> None:
    batch = _features_2d(batch, 'features')
    num = batch.shape[0]
    if not num:
      return
    mean = batch.mean(axis=0)
    centred = batch - mean
    m2 = centred.T @ centred
    if self.count == 0:
      self._mean, self._m2 = mean, m2
    else:
      total = self.count + num
      delta = mean - self._mean
      self._mean = self._mean + delta * (num / total)
      self._m2 = self._m2 + m2 + np.outer(delta, delta) * (self.count * num / total)
    room = self.keep - sum(len(k) for k in self._kept)
    if room > 0:
      self._kept.append(np.asarray(batch[:room], np.float32))
    self.count += num

  def statistics(self, check: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """(mu, sigma); ConfigError when there are not more samples than dimensions (unless not
    `check`: sigma is then singular, and zero for a single sample)."""
    dim = 0 if self._mean is None else self._mean.shape[0]
    if check:
      check_enough_samples(self.count, dim)
    return self._mean, self._m2 / max(self.count - 1, 1)

  def kept(self) -> np.ndarray:
    """The first `keep` rows seen, float32 [min(keep, count), D]."""
    return np.concatenate(self._kept) if self._kept else np.zeros((0, 0), np.float32)


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes FID statistics as pytorch-fid does: an .npz with `mu` [D] and `sigma` [D, D]."""
  save_reference(path, mu, sigma)


class ClassReference(NamedTuple):
  """Statistics of real features by class: `mu` [K, D], `sigma` [K, D, D] (float64) and `count`
  [K], the images of each class (a class without images has zeros)."""
  mu: np.ndarray
  sigma: np.ndarray
  count: np.ndarray


class Reference(NamedTuple):
  """Statistics of real features: `mu`, `sigma`, maybe a subset of the features themselves
  (`features`, for KID and precision/recall), `info` (feature_dim, resolution, data, ...) and
  maybe the statistics of each class (`classes`, a ClassReference: the classifier's file)."""
  mu: np.ndarray
  sigma: np.ndarray
  features: Optional[np.ndarray]
  info: Dict[str, Any]
  classes: Optional[ClassReference] = None


def save_reference(path: str, mu, sigma, features=None, **info) -> None:
  """Writes an .npz with `mu`, `sigma` (pytorch-fid's keys), optionally `features`, and `info`.

  `info` (JSON) also lands in scalar arrays where it is a number, so plain numpy readers see
  `feature_dim`, `resolution` and so on. The path may be local or gs://.
  """
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  _check_statistics(mu, sigma, path)
  arrays = {'mu': mu, 'sigma': sigma}
  if features is not None:
    arrays['features'] = np.asarray(features, np.float32)
  info = {'feature_dim': int(mu.shape[0]), **info}
  arrays.update({k: np.asarray(v) for k, v in info.items() if isinstance(v, (int, float))})
  arrays['info'] = np.asarray(json.dumps(info, sort_keys=True))
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())


def load_reference(path: str) -> Reference:
  """Reads a reference .npz (ours, or pytorch-fid's with `mu` and `sigma` alone).

  Raises ConfigError when the file is missing or unusable.
  """
  if not epath.Path(path).exists():
    raise ConfigError(f'FID statistics {path} not found: compute them from the reference images '
                      'first (python -m sagan_jax.reference_stats --config=... --out=PATH)')
  try:
    with np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False) as npz:
      if 'mu' not in npz.files or 'sigma' not in npz.files:
        raise ConfigError(f'{path} has no mu and sigma arrays (it holds {sorted(npz.files)}): '
                          'not FID statistics')
      mu, sigma = npz['mu'].astype(np.float64), npz['sigma'].astype(np.float64)
      features = npz['features'] if 'features' in npz.files else None
      info = json.loads(str(npz['info'])) if 'info' in npz.files else {}
  except (OSError, ValueError, EOFError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f'{path}: cannot read FID statistics ({e})') from e
  _check_statistics(mu, sigma, path)
  if features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]):
    raise ConfigError(f'{path}: features of shape {features.shape} do not match mu '
                      f'{mu.shape}: compute the file again')
  return Reference(mu, sigma, features, info)


def load_statistics(path: str) -> Tuple[np.ndarray, np.ndarray]:
  """Reads `mu` and `sigma` from an .npz (ours or pytorch-fid's); ConfigError when unusable."""
  reference = load_reference(path)
  return reference.mu, reference.sigma


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, source: str) -> None:
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ConfigError(f'{source}: FID statistics need mu [D] and sigma [D, D], got '
                      f'{mu.shape} and {sigma.shape}')


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
  with warnings.catch_warnings(), np.errstate(all='ignore'):
    warnings.simplefilter('ignore')  # Singular input: the caller checks for non-finite output.
    return scipy.linalg.sqrtm(matrix)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), float64, as pytorch-fid computes it.

  Raises ConfigError when the statistics do not fit together and ValueError when sqrtm's result
  keeps a large imaginary part (degenerate covariances).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  _check_statistics(mu1, sigma1, 'first')
  _check_statistics(mu2, sigma2, 'second')
  if mu1.shape != mu2.shape:
    raise ConfigError(f'FID statistics have different feature sizes ({mu1.shape[0]} and '
                      f'{mu2.shape[0]}): compute both with the same network and layer')
  covmean = _sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    # Near-singular product: pytorch-fid's fix, a small ridge on both covariances.
    offset = eps * np.eye(mu1.shape[0])
    covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    largest = np.abs(np.diagonal(covmean).imag).max()
    if largest > 1e-3:
      raise ValueError(f'sqrtm of the covariance product has an imaginary part of {largest:.3g}: '
                       'the covariances are degenerate (too few or identical samples?)')
    covmean = covmean.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features1, features2) -> float:
  """FID between two [N, D] feature sets (each needs N > D)."""
  features1 = _features_2d(features1, 'FID features')
  features2 = _features_2d(features2, 'FID features')
  _check_same_dim(features1, features2, 'FID feature sets')
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


# ----------------------------------------------------------------------------------------------
# IS, KID, precision and recall.


def inception_score(logits, num_splits: int = 10) -> Tuple[float, float]:
  """Mean and std over `num_splits` consecutive splits of exp(E_x KL(p(y|x) || p(y)))."""
  logits = _features_2d(logits, 'IS logits')
  num = logits.shape[0]
  if num < num_splits:
    raise ConfigError(f'Inception Score needs at least num_splits={num_splits} samples, got {num}')
  log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
  scores = []
  for i in range(num_splits):
    part = log_p[i * num // num_splits:(i + 1) * num // num_splits]
    p = np.exp(part)
    log_marginal = np.log(p.mean(axis=0))
    # 0 log 0 = 0: classes a sample gives no mass to add nothing (and cannot make inf - inf).
    kl = np.where(p > 0, p * (part - log_marginal), 0.0).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def _cubic_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def kernel_inception_distance(features1, features2, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> Tuple[float, float]:
  """Mean and std over random subsets of the unbiased MMD^2 with kernel (x.y / d + 1)^3.

  Subsets hold min(subset_size, N1, N2) samples of each set, drawn without replacement.
  """
  x_all = _features_2d(features1, 'KID features')
  y_all = _features_2d(features2, 'KID features')
  _check_same_dim(x_all, y_all, 'KID feature sets')
  m = min(subset_size, x_all.shape[0], y_all.shape[0])
  if m < 2:
    raise ConfigError(f'KID needs at least 2 samples in each set, got {x_all.shape[0]} and '
                      f'{y_all.shape[0]}')
  rng = np.random.default_rng(seed)
  estimates = []
  for _ in range(num_subsets):
    x = x_all[rng.choice(x_all.shape[0], m, replace=False)]
    y = y_all[rng.choice(y_all.shape[0], m, replace=False)]
    k_xx, k_yy = _cubic_kernel(x, x), _cubic_kernel(y, y)
    # Unbiased: the diagonal k(x_i, x_i) terms are left out of the within-set means.
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    estimates.append(within - 2.0 * _cubic_kernel(x, y).mean())
  return float(np.mean(estimates)), float(np.std(estimates))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
  return np.maximum(d2, 0.0)


def _knn_radii(features: np.ndarray, k: int, batch_size: int) -> np.ndarray:
  radii = []
  for start in range(0, features.shape[0], batch_size):
    d2 = _squared_distances(features[start:start + batch_size], features)
    radii.append(np.partition(d2, k, axis=1)[:, k])  # Position 0 is the sample itself.
  return np.sqrt(np.concatenate(radii))


def _coverage(manifold: np.ndarray, radii: np.ndarray, probes: np.ndarray,
              batch_size: int) -> float:
  inside = []
  for start in range(0, probes.shape[0], batch_size):
    d = np.sqrt(_squared_distances(probes[start:start + batch_size], manifold))
    inside.append((d <= radii[None, :]).any(axis=1))
  return float(np.concatenate(inside).mean())


def precision_recall(real_features, fake_features, k: int = 3,
                     batch_size: int = 5000) -> Tuple[float, float]:
  """Improved precision and recall: fake samples on the real manifold, and real on the fake one.

  Distances are computed `batch_size` rows at a time ([batch, N] float64 in memory).
  """
  real = _features_2d(real_features, 'precision/recall features')
  fake = _features_2d(fake_features, 'precision/recall features')
  _check_same_dim(real, fake, 'precision/recall feature sets')
  if min(real.shape[0], fake.shape[0]) <= k:
    raise ConfigError(f'precision/recall with k={k} needs more than {k} samples per set, got '
                      f'{real.shape[0]} and {fake.shape[0]}')
  precision = _coverage(real, _knn_radii(real, k, batch_size), fake, batch_size)
  recall = _coverage(fake, _knn_radii(fake, k, batch_size), real, batch_size)
  return precision, recall
