"""Sample grids: fixed latents (one row per class), PNG files, uint8 conversion; the training
loop's grids and final samples."""

import io
from typing import Any, Callable, Tuple

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sagan_jax import latents
from sagan_jax import models


def grid_latents(sample_config, z_dim: int, num_classes: int, seed: int
                 ) -> Tuple[np.ndarray, np.ndarray]:
  """Fixed z [rows * columns, z_dim] and labels: row r shows one class, spread over all classes."""
  rows = min(sample_config.num_rows, num_classes)
  classes = np.round(np.linspace(0, num_classes - 1, rows)).astype(np.int32)
  z = np.asarray(latents.sample_z(jax.random.PRNGKey(seed), rows * sample_config.num_columns,
                                  z_dim))
  return z, np.repeat(classes, sample_config.num_columns)


def create_sample_fn(generator: models.Generator):
  """A compiled `sample_fn(g_params, g_state, z, labels) -> images` in evaluation mode."""

  @jax.jit
  def sample_fn(g_params, g_state, z, labels):
    return generator.apply({'params': g_params, **g_state}, z, labels, train=False)

  return sample_fn


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 [0, 255]."""
  images = (np.asarray(images, np.float32) + 1.0) * 127.5
  return np.clip(np.round(images), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
  """Tiles [rows * cols, H, W, C] images into one [rows * H, cols * W, C] image."""
  n, h, w, c = images.shape
  cols = n // rows
  grid = images[:rows * cols].reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4)
  return grid.reshape(rows * h, cols * w, c)


def save_png(path: epath.PathLike, image: np.ndarray) -> None:
  """Writes a uint8 HxWxC image (C = 1 or 3) as PNG, on local disk or gs://."""
  image = image[..., 0] if image.shape[-1] == 1 else image
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  epath.Path(path).write_bytes(buffer.getvalue())


def interpolate(start: np.ndarray, end: np.ndarray, steps: int) -> np.ndarray:
  """`steps` points on the straight line from `start` to `end` (both included), stacked first."""
  t = np.linspace(0.0, 1.0, steps, dtype=np.float32).reshape((steps,) + (1,) * np.ndim(start))
  return (1.0 - t) * np.asarray(start, np.float32) + t * np.asarray(end, np.float32)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Integer labels -> float one-hot rows; mixtures of them condition G on blends of classes."""
  return np.eye(num_classes, dtype=np.float32)[np.asarray(labels)]


def generate(sample_fn, g_params, g_state, z_dim: int, labels: np.ndarray, rng: jax.Array,
             batch_size: int = 500, truncation: float = 0.0) -> np.ndarray:
  """Generates uint8 images for `labels`, batch by batch (z truncated when `truncation` > 0)."""
  out = []
  for start in range(0, len(labels), batch_size):
    y = jnp.asarray(labels[start:start + batch_size])
    z = latents.sample_z(jax.random.fold_in(rng, start), len(y), z_dim, truncation)
    out.append(to_uint8(sample_fn(g_params, g_state, z, y)))
  return np.concatenate(out)


def write_grid(workdir: epath.Path, writer, step: int, *, sample_fn: Callable[..., Any], state,
               grid_inputs, use_ema: bool, rows: int) -> None:
  """The grid of the fixed `grid_inputs` to TensorBoard and WORKDIR/samples/step_N.png."""
  z, labels = grid_inputs
  images = to_uint8(sample_fn(state.generator_params(use_ema), state.g_state, z, labels))
  grid = image_grid(images, rows)
  writer.write_images(step, {'samples': grid[None]})
  if jax.process_index() == 0:
    (workdir / 'samples').mkdir(parents=True, exist_ok=True)
    save_png(workdir / 'samples' / f'step_{step:07d}.png', grid)


def write_final_samples(workdir: epath.Path, config, sample_fn, state) -> None:
  """samples.npz: `final_per_class` samples of every class (uint8 images, int32 labels)."""
  labels = np.repeat(np.arange(config.data.num_classes, dtype=np.int32),
                     config.sample.final_per_class)
  images = generate(sample_fn, state.generator_params(config.sample.use_ema), state.g_state,
                    config.model.z_dim, labels, jax.random.PRNGKey(config.seed + 1))
  if jax.process_index() == 0:
    with (workdir / 'samples.npz').open('wb') as f:
      np.savez(f, images=images, labels=labels)
    logging.info('Wrote %d samples to %s', len(labels), workdir / 'samples.npz')
