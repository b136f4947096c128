"""Samples and features on device: the compiled, sharded functions that evaluation runs.

Generation and feature extraction run as one compiled function over the mesh: z and labels are
drawn on device, the batch is sharded over 'data' (padded up to a multiple of the device count;
the padding is dropped on the host), parameters are replicated and the features come back
replicated. Generated images are rounded to 8-bit levels before the feature networks see them,
as if they had been saved as PNG files, and so are the real images of the reference statistics.
On the host, FeatureSet accumulates the features' statistics batch by batch.

Standing statistics (BigGAN): `standing_statistics` replaces G's BN moving averages with the mean
of the batch moments of G in training mode over N batches of random z and labels.
"""

import dataclasses
import math
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sagan_jax import latents
from sagan_jax import progress
from sagan_jax import sharding
from sagan_jax.evaluation import inception
from sagan_jax.evaluation import metrics
from sagan_jax.evaluation import per_class
from sagan_jax.evaluation.inception_weights import PTH_NAME
from sagan_jax.layers import BATCH_STATS
from sagan_jax.layers import SPECTRAL

Outputs = Dict[str, Dict[str, jax.Array]]  # {net name: {'features': [B, D], 'logits': [B, K]}}


@dataclasses.dataclass(frozen=True)
class FeatureNet:
  """A feature network: `apply_fn(variables, images)` maps images in [-1, 1] (NHWC, the data's
  resolution and channels) to {'features': [B, feature_dim], 'logits': [B, K]}."""
  name: str
  apply_fn: Callable[[Any, jax.Array], Dict[str, jax.Array]]
  variables: Any
  feature_dim: int
  description: Dict[str, Any]


def inception_net(variables, path: str) -> FeatureNet:
  """pytorch-fid's FID Inception: pool3 features and the logits without the fc bias (for IS)."""
  model = inception.FIDInceptionV3()

  def apply_fn(v, images):
    out = model.apply(v, (images + 1.0) / 2.0)
    return {'features': out['pool3'], 'logits': out['logits_unbiased']}

  return FeatureNet('inception', apply_fn, variables, 2048,
                    {'network': f'pytorch-fid FID Inception-v3 ({PTH_NAME})',
                     'weights': str(path)})


def quantize(images: jax.Array) -> jax.Array:
  """Rounds [-1, 1] images to the 256 levels of a uint8 image (as PNG files would store them)."""
  return jnp.round(jnp.clip(images, -1.0, 1.0) * 127.5 + 127.5) / 127.5 - 1.0


def padded_size(batch_size: int, mesh) -> int:
  """`batch_size` rounded up to a multiple of the mesh's device count."""
  devices = mesh.devices.size
  return -(-batch_size // devices) * devices


def _sharded_latents(rng: jax.Array, size: int, z_dim: int, num_classes: int, truncation: float,
                     mesh):
  """latents.sample_latents inside a compiled function, the batch axis sharded over the mesh."""
  z, labels = latents.sample_latents(rng, size, z_dim, num_classes, truncation)
  data = sharding.data_sharding(mesh)
  return tuple(jax.lax.with_sharding_constraint(x, data) for x in (z, labels))


def _apply_nets(nets: Sequence[FeatureNet], net_variables, images) -> Outputs:
  images = quantize(images)
  return {net.name: net.apply_fn(v, images) for net, v in zip(nets, net_variables)}


def create_sample_features_fn(generator, z_dim: int, nets: Sequence[FeatureNet], mesh,
                              batch_size: int, truncation: float = 0.0
                              ) -> Callable[..., Tuple[Any, Outputs]]:
  """A compiled `fn(g_params, g_state, rng) -> (labels, outputs)` over one padded batch.

  z and labels come from `latents.sample_latents(rng, padded_size(batch_size), ...)`; the batch
  is sharded over the mesh, everything else replicated; the networks' variables are arguments of the
  compiled function, not constants in it.
  """
  size, replicated = padded_size(batch_size, mesh), sharding.replicated(mesh)

  def fn(g_params, g_state, net_variables, rng):
    z, labels = _sharded_latents(rng, size, z_dim, generator.num_classes, truncation, mesh)
    images = generator.apply({'params': g_params, **g_state}, z, labels, train=False)
    return labels, _apply_nets(nets, net_variables, images)

  compiled = jax.jit(fn, in_shardings=replicated, out_shardings=replicated)
  net_variables = jax.device_put(tuple(net.variables for net in nets), replicated)
  return lambda g_params, g_state, rng: compiled(g_params, g_state, net_variables, rng)


def create_features_fn(nets: Sequence[FeatureNet], mesh,
                       batch_size: int = 1) -> Callable[[np.ndarray], Outputs]:
  """`fn(images) -> outputs` for host images: padded, sharded over the mesh, cut back.

  Batches are padded to padded_size(batch_size) (larger ones to their own padded size), so
  batches of up to `batch_size` images share one compiled function.
  """
  data, replicated = sharding.data_sharding(mesh), sharding.replicated(mesh)
  compiled = jax.jit(lambda net_variables, images: _apply_nets(nets, net_variables, images),
                     in_shardings=(replicated, data), out_shardings=replicated)
  net_variables = jax.device_put(tuple(net.variables for net in nets), replicated)

  def fn(images: np.ndarray) -> Outputs:
    num = images.shape[0]
    size = padded_size(max(num, batch_size), mesh)
    padded = np.concatenate([images, np.zeros((size - num,) + images.shape[1:], images.dtype)])
    outputs = jax.device_get(compiled(net_variables, padded))
    return jax.tree.map(lambda x: x[:num], outputs)

  return fn


class FeatureSet:
  """One network's outputs over a sample set, on the host: running statistics of the features
  (with the first `keep` rows), all logits (float32) and, when `by_class`, the features' running
  statistics of each class (`class_stats`, a per_class.ClassStatistics; else None)."""

  def __init__(self, keep: int, keep_logits: bool = True, by_class: bool = False):
    self.stats = metrics.RunningStatistics(keep)
    self.keep_logits = keep_logits
    self.class_stats = per_class.ClassStatistics() if by_class else None
    self._logits: List[np.ndarray] = []

  def update(self, outputs: Dict[str, np.ndarray], labels: Optional[np.ndarray] = None) -> None:
    """Adds a batch; `labels` (the class of each row) are needed when the set is `by_class`."""
    self.stats.update(outputs['features'])
    if self.keep_logits:  # 50,000 x 1008 Inception logits are 200 MB.
      self._logits.append(np.asarray(outputs['logits'], np.float32))
    if self.class_stats is not None:
      self.class_stats.update(outputs['features'], labels)

  def logits(self) -> np.ndarray:
    return np.concatenate(self._logits)


def feature_sets(features_fn: Callable[[np.ndarray], Outputs],
                 batches: Iterable[Dict[str, np.ndarray]], keep: int,
                 by_class: bool = False) -> Dict[str, FeatureSet]:
  """FeatureSets (by network, without logits) of `batches`' images ({'image': [b, H, W, C]},
  with 'label' [b] when `by_class`): real images, for reference statistics; `features_fn` is one
  of create_features_fn. Progress lines when `batches` says how many images it holds
  (`num_examples`, as input_pipeline's eval iterators do)."""
  sets = {}
  total = getattr(batches, 'num_examples', None)
  with progress.Progress('features of real images', total or 0, 'images',
                         enabled=None if total else False) as bar:
    for batch in batches:
      for name, out in features_fn(batch['image']).items():
        sets.setdefault(name, FeatureSet(keep, False, by_class)).update(
            out, batch['label'] if by_class else None)
      bar.update(len(batch['image']))
  return sets


def batch_counts(num: int, batch_size: int) -> Iterator[Tuple[int, int]]:
  """(index, size) of the batches that make up `num` items; the last one may be smaller."""
  for index in range(math.ceil(num / batch_size)):
    yield index, min(batch_size, num - index * batch_size)


def batch_key(rng: jax.Array, index: int) -> np.ndarray:
  """fold_in(rng, index) as a host array: every process passes the same value to the compiled
  functions (a replicated input)."""
  return np.asarray(jax.random.fold_in(rng, index))


def sample_features(sample_fn, g_params, g_state, num_samples: int, batch_size: int,
                    rng: jax.Array, keep: int, keep_logits: Dict[str, bool],
                    by_class: Iterable[str] = (), show_progress: bool = False
                    ) -> Tuple[Dict[str, FeatureSet], np.ndarray]:
  """Runs `sample_fn` until `num_samples` samples; returns FeatureSets by net and the labels.

  FeatureSets keep the first `keep` feature rows, all logits of the nets `keep_logits` says, and
  per-class statistics of the nets named in `by_class`; `show_progress`: progress lines.
  Batch i draws its z and labels from batch_key(rng, i). The next batch is dispatched before the
  current one is read, so the device does not wait for the host's statistics.
  """
  by_class = set(by_class)
  sets = {name: FeatureSet(keep, with_logits, name in by_class)
          for name, with_logits in keep_logits.items()}
  labels = []
  batches = list(batch_counts(num_samples, batch_size))
  pending = sample_fn(g_params, g_state, batch_key(rng, 0))
  with progress.Progress('samples and their features', num_samples, 'samples',
                         enabled=None if show_progress else False) as bar:
    for index, count in batches:
      current = pending
      if index + 1 < len(batches):
        pending = sample_fn(g_params, g_state, batch_key(rng, index + 1))
      batch_labels, outputs = jax.device_get(current)
      labels.append(batch_labels[:count])
      for name, out in outputs.items():
        sets[name].update({k: v[:count] for k, v in out.items()}, labels[-1])
      bar.update(count)
  return sets, np.concatenate(labels)


def create_standing_stats_fn(generator, z_dim: int, mesh, batch_size: int,
                             truncation: float = 0.0):
  """A compiled `fn(g_params, g_state, rng) -> batch_stats` holding one batch's BN moments.

  G runs in training mode with BN momentum 0, so its updated moving statistics are exactly the
  batch moments; the spectral vectors it would update are dropped.
  """
  size, replicated = padded_size(batch_size, mesh), sharding.replicated(mesh)
  moments_generator = generator.clone(bn_momentum=0.0)

  def fn(g_params, g_state, rng):
    z, labels = _sharded_latents(rng, size, z_dim, generator.num_classes, truncation, mesh)
    _, updated = moments_generator.apply({'params': g_params, **g_state}, z, labels, train=True,
                                         mutable=[BATCH_STATS, SPECTRAL])
    return updated[BATCH_STATS]

  return jax.jit(fn, in_shardings=replicated, out_shardings=replicated)


def standing_statistics(standing_fn, g_params, g_state, num_batches: int, rng: jax.Array):
  """g_state with batch_stats = the mean over `num_batches` batches of their BN moments.

  Batch i draws its z and labels from batch_key(rng, i) (see create_standing_stats_fn).
  """
  total = None
  for index in range(num_batches):
    moments = standing_fn(g_params, g_state, batch_key(rng, index))
    total = moments if total is None else jax.tree.map(jnp.add, total, moments)
  return {**g_state, BATCH_STATS: jax.tree.map(lambda x: x / num_batches, total)}
