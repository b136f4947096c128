"""DiffAugment (sagan_jax.augment): the ops, gradients, sharding, the config and a train step."""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np
import pytest

from sagan_jax import augment
from sagan_jax import config_check
from sagan_jax import models
from sagan_jax import sharding
from sagan_jax import train
from sagan_jax import train_state
from sagan_jax.errors import ConfigError
from tests.conftest import tiny_config
from tests.tolerances import EPS32

RNG = jax.random.PRNGKey(3)
POLICY = 'color,translation,cutout'


def _images(shape=(16, 32, 32, 3), low=-1.0, high=1.0, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32))


def test_color_ops_shift_and_scale_each_image_by_its_own_number():
  x = _images()
  moved = np.asarray(augment.brightness(RNG, x) - x)  # One offset per image in [-0.5, 0.5).
  offsets = moved[:, 0, 0, 0]
  np.testing.assert_allclose(moved, np.broadcast_to(offsets[:, None, None, None], x.shape),
                             atol=4 * EPS32)
  assert np.all(offsets >= -0.5) and np.all(offsets < 0.5) and len(set(offsets)) == len(x)
  # Saturation keeps each pixel's channel mean; contrast each image's mean.
  np.testing.assert_allclose(jnp.mean(augment.saturation(RNG, x), -1), jnp.mean(x, -1),
                             atol=8 * EPS32)
  np.testing.assert_allclose(jnp.mean(augment.contrast(RNG, x), (1, 2, 3)),
                             jnp.mean(x, (1, 2, 3)), atol=8 * EPS32)
  gray = _images((4, 8, 8, 1))
  np.testing.assert_array_equal(augment.saturation(RNG, gray), gray)  # No colour to scale.


def _shift(image, dy, dx):
  out = np.zeros_like(image)
  h, w = image.shape[:2]
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = (
      image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)])
  return out


def test_translation_shifts_each_image_by_at_most_an_eighth_with_zeros():
  x = np.asarray(_images())
  out = np.asarray(augment.translation(RNG, jnp.asarray(x)))
  shifts = []
  for image, moved in zip(x, out):
    found = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
             if np.array_equal(_shift(image, dy, dx), moved)]
    assert len(found) == 1
    shifts += found
  assert len(set(shifts)) > 8  # Independent per image.


def test_cutout_zeros_a_clipped_square_of_half_the_size():
  x = _images(low=0.1)  # No zeros of its own.
  zeroed = np.asarray(augment.cutout(RNG, x)) == 0
  np.testing.assert_array_equal(np.asarray(augment.cutout(RNG, x))[~zeroed], np.asarray(x)[~zeroed])
  corners = set()
  for mask in zeroed[..., 0]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    assert mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() and mask.sum() == (
        len(rows) * len(cols))  # One rectangle: the square clipped at the border.
    assert 8 <= len(rows) <= 16 and 8 <= len(cols) <= 16
    corners.add((rows[0], cols[0]))
  assert len(corners) > 8 and zeroed.all(-1).sum() == zeroed[..., 0].sum()  # All channels.


def test_zero_magnitude_changes_nothing():
  x = _images()
  np.testing.assert_array_equal(augment.translation(RNG, x, ratio=0.0), x)
  np.testing.assert_array_equal(augment.cutout(RNG, x, ratio=0.0), x)


@pytest.mark.parametrize('policy', ['color', 'translation', 'cutout', POLICY])
def test_gradients_reach_the_images_through_every_op(policy):
  x, w = _images(), _images(seed=1)
  aug = augment.create_augment(policy)
  grad = jax.grad(lambda x: jnp.sum(aug(RNG, x) * w))(x)
  assert np.all(np.isfinite(grad)) and np.count_nonzero(grad) > x.size // 2


def test_policy_names_apply_in_order_with_one_key_each():
  assert augment.create_augment('') is None and augment.create_augment(None) is None
  assert augment.parse_policy(' color , cutout ') == ('color', 'cutout')
  x = _images()
  expected = augment.cutout(jax.random.fold_in(RNG, 1),
                            augment.translation(jax.random.fold_in(RNG, 0), x))
  np.testing.assert_array_equal(augment.create_augment('translation,cutout')(RNG, x), expected)
  with pytest.raises(ConfigError, match="'zoom'.*color, translation, cutout"):
    augment.parse_policy('color,zoom')


def test_sharded_batch_is_augmented_as_on_one_device():
  x = _images()
  mesh = Mesh(np.array(jax.devices()), ('data',))
  assert mesh.devices.size == 8
  batch_sharding = NamedSharding(mesh, PartitionSpec('data'))
  sharded = jax.device_put(x, batch_sharding)
  for policy in ('translation,cutout', POLICY):
    aug = augment.create_augment(policy)
    one = np.asarray(jax.jit(aug)(RNG, x))
    eight = jax.jit(aug, out_shardings=batch_sharding)(RNG, sharded)
    assert len(eight.addressable_shards) == 8
    if policy == POLICY:  # Per-image means: the same sums, at most reassociated.
      np.testing.assert_allclose(np.asarray(eight), one, rtol=0, atol=16 * EPS32)
    else:  # Gathers and masks: exact.
      np.testing.assert_array_equal(np.asarray(eight), one)


def test_config_check_rejects_unknown_policies_and_negative_subsets():
  config = tiny_config()
  config.train.augment = POLICY
  config_check.check_config(config)
  config.train.augment = 'color,flip'
  with pytest.raises(ConfigError, match="train.augment policy 'flip'"):
    config_check.check_config(config)
  config.train.augment = ''
  config.data.max_examples = -1
  with pytest.raises(ConfigError, match='data.max_examples=-1 is out of range'):
    config_check.check_config(config)


def test_empty_policy_leaves_the_step_as_it_was():
  config = tiny_config()
  generator, discriminator = models.create_models(config)
  ctx = train.create_step_context(config, generator, discriminator)
  # The step is a function of its StepContext: the same context, the same traced step.
  assert ctx.hooks == train.StepHooks()
  assert ctx == train.create_step_context(config, generator, discriminator,
                                          hooks=train.StepHooks())


@pytest.fixture(scope='module')
def augmented_step():
  """One train step of the tiny config with the paper's policy (without attention, on one
  device: a quicker compile; the ops' shard invariance has its own test above)."""
  config = tiny_config()
  config.train.augment = POLICY
  config.model.g_attention = config.model.d_attention = ()
  config_check.check_config(config)
  generator, discriminator = models.create_models(config)
  mesh = sharding.create_mesh(jax.devices()[:1])
  step_fn = train.create_train_step(config, generator, discriminator, mesh)
  state = train_state.create_sharded_train_state(config, generator, discriminator,
                                                 jax.random.PRNGKey(0), mesh)
  before = jax.device_get(state)
  rng = np.random.default_rng(0)
  shape = (1, 8, 32, 32, 1)
  batch = {'image': rng.uniform(-1, 1, shape).astype(np.float32),
           'label': rng.integers(0, 10, shape[:2]).astype(np.int32)}
  after, metrics = train.compile_train_step(step_fn, mesh)(
      state, sharding.make_global_batch(batch, mesh))
  return before, jax.device_get(after), jax.device_get(metrics)


def test_augmented_train_step_runs_with_finite_metrics(augmented_step):
  before, after, metrics = augmented_step
  assert bool(metrics['train/all_finite'])
  for name, value in metrics.items():
    assert np.all(np.isfinite(value)), name
  assert metrics['train/d_grad_norm'] > 0 and metrics['train/g_grad_norm'] > 0
  assert int(after.step) == 1
  for net in ('g_params', 'd_params'):
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), getattr(before, net),
                           getattr(after, net))
    assert any(jax.tree.leaves(changed)), net
