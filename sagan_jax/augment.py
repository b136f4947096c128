"""DiffAugment: differentiable augmentations of every image D sees (`train.augment`).

Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training": the same random
transformations applied to real and fake images, inside the differentiated D and G losses, keep D
from memorizing a small training set, and G's gradient flows back through them. The policies,
on images in [-1, 1] ([B, H, W, C]):
- 'color': brightness (add uniform[-0.5, 0.5) per image), then saturation (scale each pixel's
  deviation from its channel mean by uniform[0, 2); the identity on grayscale, C = 1, images, which
  have no colour to scale), then contrast (scale the deviation from the image's mean by
  uniform[0.5, 1.5)).
- 'translation': shift by integers uniform in [-s, s] in y and x, s = 1/8 of the size (rounded),
  the uncovered border filled with zeros.
- 'cutout': zero a square of half the size whose centre is uniform over the pixels (clipped at
  the border).

`create_augment(policy)` gives `augment(rng, images) -> images` for train.StepHooks. Every random
number is drawn for the whole batch from `rng` (the step's key, equal on every device) with one
value per image, and the ops are elementwise, per-image reductions, gathers along one image's
axes and masks, so a batch sharded over the mesh is augmented exactly as on one device. Each op
keeps the images' dtype; gradients reach the images through every op (the gathers' transpose is a
scatter, the cutout mask multiplies).
"""

from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from sagan_jax.errors import ConfigError

Augment = Callable[[jax.Array, jax.Array], jax.Array]  # (rng, images [B, H, W, C]) -> images

TRANSLATION_RATIO = 1 / 8  # Largest shift, as a fraction of the image size.
CUTOUT_RATIO = 1 / 2  # The cut square's side, as a fraction of the image size.


def _per_image(rng: jax.Array, images: jax.Array, low: float, high: float) -> jax.Array:
  """uniform[low, high) per image, shaped [B, 1, 1, 1] to broadcast over the image."""
  u = jax.random.uniform(rng, (images.shape[0], 1, 1, 1), jnp.float32, low, high)
  return u.astype(images.dtype)


def brightness(rng: jax.Array, images: jax.Array) -> jax.Array:
  return images + _per_image(rng, images, -0.5, 0.5)


def saturation(rng: jax.Array, images: jax.Array) -> jax.Array:
  """Scales each pixel's deviation from its channel mean; grayscale images are returned as is."""
  if images.shape[-1] == 1:
    return images
  mean = jnp.mean(images, axis=-1, keepdims=True)
  return (images - mean) * _per_image(rng, images, 0.0, 2.0) + mean


def contrast(rng: jax.Array, images: jax.Array) -> jax.Array:
  mean = jnp.mean(images, axis=(1, 2, 3), keepdims=True)
  return (images - mean) * _per_image(rng, images, 0.5, 1.5) + mean


def color(rng: jax.Array, images: jax.Array) -> jax.Array:
  """Brightness, saturation, contrast in that order, each with its own key."""
  for i, op in enumerate((brightness, saturation, contrast)):
    images = op(jax.random.fold_in(rng, i), images)
  return images


def _shift_axis(images: jax.Array, shift: jax.Array, axis: int) -> jax.Array:
  """Each image moved by its `shift` [B] pixels along `axis` (1: y, 2: x), zeros shifted in.

  Output pixel i reads input pixel i - shift (a gather along the axis); out of range it is 0.
  """
  size = images.shape[axis]
  index = jnp.arange(size).reshape([size if d == axis else 1 for d in range(4)])
  source = index - shift.reshape(-1, 1, 1, 1)  # [B, size, 1, 1] or [B, 1, size, 1].
  inside = (source >= 0) & (source < size)
  moved = jnp.take_along_axis(images, source, axis=axis, mode='clip')
  return jnp.where(inside, moved, jnp.zeros((), images.dtype))


def translation(rng: jax.Array, images: jax.Array,
                ratio: float = TRANSLATION_RATIO) -> jax.Array:
  """Shifts each image by integers uniform in [-s, s] (y and x apart), s = round(ratio * size)."""
  shifts = []
  for axis, key in zip((1, 2), jax.random.split(rng)):
    limit = int(images.shape[axis] * ratio + 0.5)
    shifts.append(jax.random.randint(key, (images.shape[0],), -limit, limit + 1))
  return _shift_axis(_shift_axis(images, shifts[0], 1), shifts[1], 2)


def cutout(rng: jax.Array, images: jax.Array, ratio: float = CUTOUT_RATIO) -> jax.Array:
  """Zeros a square of side round(ratio * size) per image, centred on a uniform pixel, clipped."""
  mask = jnp.ones((), bool)
  for axis, key in zip((1, 2), jax.random.split(rng)):
    size = images.shape[axis]
    side = int(size * ratio + 0.5)
    start = jax.random.randint(key, (images.shape[0], 1, 1, 1), 0, size) - side // 2
    index = jnp.arange(size).reshape([size if d == axis else 1 for d in range(4)])
    mask = mask & (index >= start) & (index < start + side)
  return jnp.where(mask, jnp.zeros((), images.dtype), images)


POLICIES = {'color': color, 'translation': translation, 'cutout': cutout}


def parse_policy(policy: Optional[str], field: str = 'train.augment') -> Tuple[str, ...]:
  """'color,translation' -> ('color', 'translation'); '' or None -> (); ConfigError if unknown.

  `field` is the config field the policy came from, named in the error.
  """
  names = tuple(name.strip() for name in (policy or '').split(',') if name.strip())
  unknown = [name for name in names if name not in POLICIES]
  if unknown:
    off = "'' (off) or " if field == 'train.augment' else ''
    raise ConfigError(f"unknown {field} policy '{unknown[0]}': set --config.{field} to {off}"
                      f"comma-separated names from {', '.join(POLICIES)} (e.g. "
                      "'color,translation,cutout')")
  return names


def create_augment(policy: Optional[str], field: str = 'train.augment') -> Optional[Augment]:
  """`augment(rng, images) -> images` applying the policy's ops in order; None when it is empty.

  Op i of the policy draws from fold_in(rng, i); `field` as in parse_policy.
  """
  ops = tuple(POLICIES[name] for name in parse_policy(policy, field))
  if not ops:
    return None

  def augment(rng: jax.Array, images: jax.Array) -> jax.Array:
    for i, op in enumerate(ops):
      images = op(jax.random.fold_in(rng, i), images)
    return images

  return augment
