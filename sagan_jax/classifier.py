"""Scores class-conditional samples with a small classifier trained on Fashion-MNIST's test split.

  python -m sagan_jax.classifier --workdir=runs/fashion_mnist

reads WORKDIR/samples.npz (written at the end of training when `sample.final_per_class` > 0),
trains a small CNN on the 10,000 test images (never seen by the GAN), checks it on 10,000 training
images, and reports the share of samples classified as the class they were generated for. It
writes WORKDIR/class_accuracy.json. This is not FID: it only asks whether each sample looks like
its class.
"""

import json
import sys
import time
from typing import Dict, Tuple

from absl import app
from absl import flags
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sagan_jax.errors import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training workdir holding samples.npz.')
flags.DEFINE_string('fashion_mnist_dir', '/usr/share/datasets/fashion-mnist',
                    'Folder of the Fashion-MNIST IDX .gz files.')
flags.DEFINE_integer('epochs', 8, 'Classifier training epochs over the 10,000 test images.')
flags.DEFINE_integer('seed', 0, 'Classifier seed.')


class SmallCNN(nn.Module):
  """conv32 -> pool -> conv64 -> pool -> dense128 -> 10 logits, for 32x32 grayscale in [-1, 1]."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for features in (32, 64):
      x = nn.max_pool(nn.relu(nn.Conv(features, (3, 3))(x)), (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x)


def pad_to_32(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 [N, 28, 28, 1] -> float32 [N, 32, 32, 1] in [-1, 1], as the demo's input pipeline."""
  images = np.pad(images_uint8, ((0, 0), (2, 2), (2, 2), (0, 0)))
  return images.astype(np.float32) / 127.5 - 1.0


def train_classifier(images: np.ndarray, labels: np.ndarray, epochs: int, seed: int,
                     batch_size: int = 128) -> Tuple[SmallCNN, Dict]:
  """Trains SmallCNN with Adam on float images in [-1, 1]; returns the model and its params."""
  model = SmallCNN()
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + images.shape[1:]))['params']
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({'params': p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(images))
    for start in range(0, len(order) - batch_size + 1, batch_size):
      idx = order[start:start + batch_size]
      params, opt_state = step(params, opt_state, images[idx], labels[idx])
  return model, params


def accuracy(model: SmallCNN, params, images: np.ndarray, labels: np.ndarray) -> float:
  predict = jax.jit(lambda x: jnp.argmax(model.apply({'params': params}, x), -1))
  hits = sum(int(np.sum(np.asarray(predict(images[i:i + 1000])) == labels[i:i + 1000]))
             for i in range(0, len(images), 1000))
  return hits / len(images)


def score_samples(workdir: str, fashion_mnist_dir: str, epochs: int, seed: int) -> Dict:
  """Trains the classifier and scores WORKDIR/samples.npz; returns and writes the figures."""
  from sagan_jax import input_pipeline  # TensorFlow only here.
  path = epath.Path(workdir) / 'samples.npz'
  if not path.exists():
    raise ConfigError(f'{path} does not exist: train with --config.sample.final_per_class=100 '
                      '(configs/fashion_mnist.py does) so training writes it at the end')
  with path.open('rb') as f:
    samples = np.load(f)
    sample_images = samples['images'].astype(np.float32) / 127.5 - 1.0
    sample_labels = samples['labels']
  test_images, test_labels = input_pipeline.load_fashion_mnist(fashion_mnist_dir, 'test')
  train_images, train_labels = input_pipeline.load_fashion_mnist(fashion_mnist_dir, 'train')
  if sample_images.shape[1:] != (32, 32, 1):
    raise ConfigError(f'samples have shape {sample_images.shape[1:]}, the classifier reads '
                      '32x32x1 Fashion-MNIST samples')
  start = time.perf_counter()
  model, params = train_classifier(pad_to_32(test_images), test_labels, epochs, seed)
  result = {
      'classifier_train_split': 'fashion_mnist test (10000 images)',
      'classifier_accuracy_on_real_train_images': accuracy(
          model, params, pad_to_32(train_images[:10000]), train_labels[:10000]),
      'class_accuracy': accuracy(model, params, sample_images, sample_labels),
      'num_samples': int(len(sample_labels)),
      'classifier_seconds': round(time.perf_counter() - start, 1),
  }
  (epath.Path(workdir) / 'class_accuracy.json').write_text(json.dumps(result, indent=2))
  return result


def main(argv):
  del argv
  try:
    result = score_samples(FLAGS.workdir, FLAGS.fashion_mnist_dir, FLAGS.epochs, FLAGS.seed)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  real = result['classifier_accuracy_on_real_train_images']
  print(f'classifier accuracy on real images: {real:.4f}')
  print(f"class accuracy of {result['num_samples']} generated samples: "
        f"{result['class_accuracy']:.4f}")


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
