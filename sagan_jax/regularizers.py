"""Extra terms of D's loss (train.StepHooks.d_regularizers): consistency regularization.

CR (Zhang, Zhang, Odena and Lee 2020, "Consistency Regularization for Generative Adversarial
Networks") asks D to score an augmented real image as it scores the image itself:

    L_D += real_weight * mean_i (D(T(x_i)) - D(x_i))^2      over the real images x_i

and bCR (Zhao et al. 2021, "Improved Consistency Regularization for GANs") adds the same term
for the fake images with `fake_weight`. T is a DiffAugment policy (sagan_jax.augment), drawn
afresh per image; gradients reach D's parameters through both logits. Only D's loss changes: G's
loss and every image G is scored on stay as they were. Set by `train.consistency_weight`,
`train.consistency_fake_weight` and `train.consistency_augment`; both weights 0 (the SAGAN
recipe) adds nothing to the step.

The images D saw are [real; fake] (train._d_loss, after any `train.augment`), so the first half
is real. The term costs one more D forward and backward per real image (and per fake with bCR).
"""

from typing import Tuple

import jax
import jax.numpy as jnp

from sagan_jax import augment as augment_lib
from sagan_jax.errors import ConfigError


def consistency(real_weight: float, fake_weight: float, policy: str):
  """The (b)CR regularizer `reg(inputs, rng) -> (term, metrics)` for D's loss (module doc)."""
  transform = augment_lib.create_augment(policy, 'train.consistency_augment')
  if transform is None:
    raise ConfigError('train.consistency_augment is empty: set --config.train.consistency_augment '
                      "to a DiffAugment policy, e.g. 'translation' (the CR paper's shifts)")

  def regularizer(inputs, rng: jax.Array) -> Tuple[jax.Array, dict]:
    num_real = inputs.images.shape[0] // 2
    count = num_real if not fake_weight else inputs.images.shape[0]  # real only, or real + fake
    images, labels = inputs.images[:count], inputs.labels[:count]
    logits = inputs.logits[:count].astype(jnp.float32)
    moved = inputs.discriminator(transform(rng, images), labels).astype(jnp.float32)
    squares = jnp.square(moved - logits)
    real = jnp.mean(squares[:num_real])
    term, metrics = real_weight * real, {'train/d_consistency_real': real}
    if fake_weight:  # bCR: the fakes were transformed too.
      fake = jnp.mean(squares[num_real:])
      term, metrics['train/d_consistency_fake'] = term + fake_weight * fake, fake
    return term, metrics

  return regularizer


def d_regularizers_from_config(train_config) -> tuple:
  """D's regularizers that `train_config` asks for: (b)CR when a consistency weight is set."""
  real_weight = train_config.get('consistency_weight', 0.0)
  fake_weight = train_config.get('consistency_fake_weight', 0.0)
  if not real_weight and not fake_weight:
    return ()
  return (consistency(real_weight, fake_weight,
                      train_config.get('consistency_augment', 'translation')),)
