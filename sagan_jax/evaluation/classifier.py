"""The small classifier network and its file: a feature network where Inception is absent.

A CNN trained on the data set itself (`python -m sagan_jax.classifier` trains it and writes the
file) at the data's resolution and channel count. Its 128-d penultimate features give
`fd_classifier` (a Frechet distance against the training images' features: not FID, and not
comparable with it) and `intra_fd_classifier` (the same per class), its predictions
`class_accuracy`.

The file is one .npz: the parameters as 'params/<module>/<name>' arrays, 'metadata' (JSON: classes,
class_names, widths, feature size, resolution, channels, data, training, the held-out accuracy
overall and per class with the held-out images per class) and the reference statistics of the
training images' features ('reference/mu', 'reference/sigma', 'reference/features',
'reference/info'; per class, for at most MAX_CLASS_REFERENCE classes: 'reference/class_mu' [K, D],
'reference/class_sigma' [K, D, D], 'reference/class_count' [K]). Files written before the
per-class figures (no class_names, held-out accuracies per class or per-class statistics) load:
what they lack is None.
"""

import io
import json
import zipfile
from typing import Any, Dict, Tuple

from etils import epath
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sagan_jax.errors import ConfigError
from sagan_jax.evaluation import features
from sagan_jax.evaluation import metrics

FEATURE_DIM = 128
FINAL_SIZE = 8  # Conv stages halve the images down to 8x8 before the dense layers.
TRAIN_HINT = 'python -m sagan_jax.classifier --config=<the training config> --out=PATH'
# Per-class reference statistics are written for at most this many classes: their covariances
# take K x 128 x 128 x 8 bytes, 13 MB for 100 classes but 131 MB for ImageNet's 1000.
MAX_CLASS_REFERENCE = 100


class Classifier(nn.Module):
  """Conv3x3-ReLU-maxpool stages down to 8x8 -> dense 128 (the features) -> dropout -> logits."""
  num_classes: int
  widths: Tuple[int, ...]
  feature_dim: int = FEATURE_DIM
  dropout_rate: float = 0.3

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> Dict[str, jax.Array]:
    x = images
    for width in self.widths:
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    embedding = nn.relu(nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))
    hidden = nn.Dropout(self.dropout_rate, deterministic=not train)(embedding)
    return {'features': embedding, 'logits': nn.Dense(self.num_classes)(hidden)}


def stage_widths(resolution: int) -> Tuple[int, ...]:
  """Channels of the conv stages: 32, 64, ... (at most 256), one stage per halving to 8x8."""
  stages = int(np.log2(resolution // FINAL_SIZE)) if resolution >= FINAL_SIZE else -1
  if stages < 0 or FINAL_SIZE * 2**stages != resolution:
    raise ConfigError(f'the classifier needs a power-of-two resolution of at least {FINAL_SIZE}, '
                      f'not {resolution}: set --config.data.resolution')
  return tuple(min(32 * 2**i, 256) for i in range(stages))


def create_classifier(data_config) -> Classifier:
  return Classifier(data_config.num_classes, stage_widths(data_config.resolution))


def feature_net(model: Classifier, params, description: Dict[str, Any]) -> features.FeatureNet:
  """The classifier as the evaluator's FeatureNet named 'classifier'."""
  return features.FeatureNet('classifier', lambda v, x: model.apply(v, x), {'params': params},
                             model.feature_dim, description)


def save(path: str, params, metadata: Dict[str, Any], reference: metrics.Reference) -> None:
  """One .npz: 'params/...' arrays, 'metadata' (JSON) and the 'reference/...' statistics."""
  flat = traverse_util.flatten_dict(jax.device_get(params), sep='/')
  arrays = {f'params/{k}': np.asarray(v) for k, v in flat.items()}
  arrays.update({'metadata': np.asarray(json.dumps(metadata, sort_keys=True)),
                 'reference/mu': reference.mu, 'reference/sigma': reference.sigma,
                 'reference/features': reference.features,
                 'reference/info': np.asarray(json.dumps(reference.info, sort_keys=True))})
  if reference.classes is not None:
    arrays.update({f'reference/class_{k}': np.asarray(v) for k, v in
                   reference.classes._asdict().items()})
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  epath.Path(path).write_bytes(buffer.getvalue())


def load_feature_net(path: str) -> Tuple[features.FeatureNet, metrics.Reference]:
  """The classifier of a file written by `save` as a FeatureNet, and its reference statistics."""
  if not epath.Path(path).exists():
    raise ConfigError(f'classifier {path} not found: train it with `{TRAIN_HINT}`')
  try:
    with np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False) as npz:
      metadata = json.loads(str(npz['metadata']))
      flat = {k[len('params/'):]: jnp.asarray(npz[k]) for k in npz.files
              if k.startswith('params/')}
      classes = None
      if 'reference/class_mu' in npz.files:  # Older files have no per-class statistics.
        classes = metrics.ClassReference(*(npz[f'reference/class_{k}']
                                           for k in metrics.ClassReference._fields))
      reference = metrics.Reference(npz['reference/mu'], npz['reference/sigma'],
                                    npz['reference/features'],
                                    json.loads(str(npz['reference/info'])), classes)
    model = Classifier(metadata['num_classes'], tuple(metadata['widths']),
                       metadata['feature_dim'])
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise ConfigError(f'{path} is not a classifier file of `python -m sagan_jax.classifier` '
                      f'({type(e).__name__}: {e}): train it again') from e
  description = {'network': 'sagan_jax.classifier (trained on the data set; not Inception)',
                 'path': str(path), **metadata}
  params = traverse_util.unflatten_dict(flat, sep='/')
  return feature_net(model, params, description), reference


def check_compatible(net: features.FeatureNet, config, path: str) -> None:
  """ConfigError unless the classifier reads the generator's resolution, channels and classes."""
  data = config.data
  for field in ('resolution', 'channels', 'num_classes'):
    if net.description[field] != data[field]:
      raise ConfigError(f'{path} was trained on data.{field}={net.description[field]} but the '
                        f'generator has data.{field}={data[field]}: train a classifier with the '
                        'training config (python -m sagan_jax.classifier --config=... --out=...)')
