"""Progressive growing: the grown networks against the fixed ones (run op by op, no compiles),
the schedule, the config errors and the stages' input streams."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sagan_jax import config_check
from sagan_jax import input_pipeline
from sagan_jax import layers
from sagan_jax import models
from sagan_jax import progressive
from sagan_jax.errors import ConfigError
from tests.conftest import tiny_config


def grown_config(data_dir='/nonexistent', stages=(8, 16, 32)):
  config = tiny_config(data_dir)
  config.model.progressive_resolutions = stages
  config.train.num_steps = 4
  config.train.progressive_stage_steps = (1, 2) if len(stages) == 3 else (2,)
  config.train.progressive_fade_steps = 1 if len(stages) == 3 else 2
  return config


def clean(variables):
  return {k: v for k, v in variables.items() if k != 'intermediates'}


def subtree(tree, like):
  """The part of `tree` with the keys of `like` (nested dicts)."""
  return {k: subtree(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}


def with_alpha(variables, alpha):
  return {**variables, models.PROGRESS: {'alpha': jnp.float32(alpha)}}


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------------------------
# The networks, op by op: 8 -> 16 -> 32 with attention at 16 in G and D (as the demo).


@pytest.fixture(scope='module')
def nets():
  config = grown_config()
  fixed_config = tiny_config()
  grown_g, grown_d = models.create_models(config)
  fixed_g, fixed_d = models.create_models(fixed_config)
  z = jax.random.normal(jax.random.PRNGKey(0), (4, config.model.z_dim))
  labels = jnp.array([0, 3, 7, 9])
  images = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 1), minval=-1, maxval=1)
  initial = (clean(grown_g.init(jax.random.PRNGKey(2), z, labels, train=True)),
             clean(grown_d.init(jax.random.PRNGKey(3), images, labels, update_sn=True)))
  g_vars, d_vars = initial
  fixed_g_vars = clean(fixed_g.init(jax.random.PRNGKey(2), z, labels, train=True))
  fixed_d_vars = clean(fixed_d.init(jax.random.PRNGKey(3), images, labels, update_sn=True))
  # Trained-looking BN statistics and attention gammas (0 at init would hide the attention).
  rng = np.random.default_rng(0)
  perturb = lambda tree: jax.tree.map(  # pylint: disable=g-long-lambda
      lambda x: x + rng.uniform(0.1, 0.5, x.shape).astype(np.float32), tree)
  g_vars = {**g_vars, 'params': perturb(g_vars['params']),
            'batch_stats': perturb(g_vars['batch_stats'])}
  d_vars = {**d_vars, 'params': perturb(d_vars['params'])}
  return dict(config=config, grown=(grown_g, grown_d), fixed=(fixed_g, fixed_d), z=z,
              labels=labels, images=images, g_vars=g_vars, d_vars=d_vars, initial=initial,
              fixed_vars=(fixed_g_vars, fixed_d_vars))


def test_the_last_stage_at_alpha_1_is_the_fixed_network_bit_for_bit(nets):
  """At alpha = 1 the blends are 1 * x + 0 * y = x exactly, and the kept path computes what the
  fixed network computes in the same order: equal on one backend, bit for bit."""
  (grown_g, grown_d), (fixed_g, fixed_d) = nets['grown'], nets['fixed']
  fixed_g_vars, fixed_d_vars = nets['fixed_vars']
  g_vars, d_vars = nets['g_vars'], nets['d_vars']
  assert grown_g.fades_in and grown_d.fades_in
  z, labels, images = nets['z'], nets['labels'], nets['images']
  for train in (False, True):
    grown = grown_g.apply(g_vars, z, labels, train=train, mutable=['batch_stats', 'spectral'])
    fixed = fixed_g.apply(subtree(g_vars, fixed_g_vars), z, labels, train=train,
                          mutable=['batch_stats', 'spectral'])
    np.testing.assert_array_equal(grown[0], fixed[0])
    assert_trees_equal(subtree(grown[1], fixed[1]), fixed[1])  # The same layers' updates.
  grown_logits = grown_d.apply(d_vars, images, labels, update_sn=True, mutable=['spectral'])
  fixed_logits = fixed_d.apply(subtree(d_vars, fixed_d_vars), images, labels, update_sn=True,
                               mutable=['spectral'])
  np.testing.assert_array_equal(grown_logits[0], fixed_logits[0])
  assert np.abs(grown_logits[0]).min() > 0


def test_a_stage_at_alpha_0_is_the_previous_stage_upsampled(nets):
  """The fade starts where the previous stage ended: G's image is the previous stage's image
  upsampled, D's logits are the previous stage's on the 2x2-pooled images, exactly."""
  (grown_g, grown_d), (z, labels) = nets['grown'], (nets['z'], nets['labels'])
  g_vars, d_vars = nets['g_vars'], nets['d_vars']
  real = nets['images']
  for res in (16, 32):
    image = grown_g.clone(stage_resolution=res).apply(with_alpha(g_vars, 0.0), z, labels,
                                                      train=False)
    previous = grown_g.clone(stage_resolution=res // 2).apply(g_vars, z, labels, train=False)
    assert image.shape == (4, res, res, 1) and previous.shape == (4, res // 2, res // 2, 1)
    np.testing.assert_array_equal(image, layers.upsample_2x(previous))
    x = real[:, ::32 // res, ::32 // res]
    logits = grown_d.clone(stage_resolution=res).apply(with_alpha(d_vars, 0.0), x, labels,
                                                       update_sn=False)
    previous_logits = grown_d.clone(stage_resolution=res // 2).apply(
        d_vars, layers.avg_pool_2x2(x), labels, update_sn=False)
    np.testing.assert_array_equal(logits, previous_logits)
    halfway = grown_d.clone(stage_resolution=res).apply(with_alpha(d_vars, 0.5), x, labels,
                                                        update_sn=False)
    assert np.abs(halfway - logits).max() > 1e-3  # alpha is read.
  # Sampling at a low stage: its images nearest-upsampled to the data resolution.
  g8 = grown_g.clone(stage_resolution=8)
  big = g8.clone(output_resolution=32).apply(g_vars, z, labels, train=False)
  small = g8.apply(g_vars, z, labels, train=False)
  np.testing.assert_array_equal(big, jnp.repeat(jnp.repeat(small, 4, axis=1), 4, axis=2))


def test_every_stage_shares_one_variable_tree_and_the_fixed_tree_is_unchanged(nets):
  """Grown networks add the stages' heads and from-RGB layers (and alpha) to the fixed tree; the
  fixed network's layers start from the same values; init at any stage gives the same tree."""
  config = nets['config']
  (grown_g, grown_d), (fixed_g_vars, fixed_d_vars) = nets['grown'], nets['fixed_vars']
  z, labels = nets['z'], nets['labels']
  assert set(fixed_g_vars) == {'params', 'spectral', 'batch_stats'}
  assert set(fixed_d_vars) == {'params', 'spectral'}
  assert sorted(fixed_g_vars['params']) == [
      'attention16', 'block0', 'block1', 'block2', 'bn_out', 'conv_out', 'linear']
  g_vars, d_vars = nets['initial']
  assert sorted(set(g_vars['params']) - set(fixed_g_vars['params'])) == [
      'bn_out_16', 'bn_out_8', 'conv_out_16', 'conv_out_8']
  assert list(g_vars[models.PROGRESS]) == ['alpha']
  assert float(g_vars[models.PROGRESS]['alpha']) == float(d_vars[models.PROGRESS]['alpha']) == 1
  for collection in fixed_g_vars:
    assert_trees_equal(subtree(g_vars[collection], fixed_g_vars[collection]),
                       fixed_g_vars[collection])
  assert sorted(set(d_vars['params']) - set(fixed_d_vars['params'])) == [
      'from_rgb_16', 'from_rgb_8']
  # from_rgb_R maps to the width of the map the first block of input resolution R reads.
  assert d_vars['params']['from_rgb_8']['kernel'].shape == (1, 1, 1, 4 * config.model.ch)
  for collection in fixed_d_vars:
    assert_trees_equal(subtree(d_vars[collection], fixed_d_vars[collection]),
                       fixed_d_vars[collection])
  small_g = jax.eval_shape(lambda: grown_g.clone(stage_resolution=8).init(
      jax.random.PRNGKey(2), z, labels, train=True))
  small_d = jax.eval_shape(lambda: grown_d.clone(stage_resolution=8).init(
      jax.random.PRNGKey(3), jnp.zeros((4, 8, 8, 1)), labels, update_sn=True))
  assert jax.tree.structure(clean(small_g)) == jax.tree.structure(g_vars)
  assert jax.tree.structure(clean(small_d)) == jax.tree.structure(d_vars)


# ----------------------------------------------------------------------------------------------
# The schedule and the config checks.


def test_schedule_stages_and_alpha_at_boundaries_and_during_fades():
  schedule = progressive.Schedule((8, 16, 32), (100, 300), 50)
  assert [schedule.stage_index(s) for s in (0, 99, 100, 299, 300, 10**6)] == [0, 0, 1, 1, 2, 2]
  assert [schedule.resolution(s) for s in (0, 100, 300)] == [8, 16, 32]
  assert [schedule.stage_start(i) for i in range(3)] == [0, 100, 300]
  alphas = {s: float(schedule.alpha(s)) for s in (0, 99, 100, 125, 149, 150, 299, 300, 349, 350)}
  assert alphas == pytest.approx({0: 1, 99: 1, 100: 0, 125: 0.5, 149: 0.98, 150: 1, 299: 1,
                                  300: 0, 349: 0.98, 350: 1}, rel=1e-6)
  traced = jax.jit(schedule.alpha)(jnp.int32(325))
  assert traced.dtype == jnp.float32 and float(traced) == 0.5
  assert float(progressive.Schedule((8, 16), (100,), 0).alpha(100)) == 1.0
  assert progressive.describe_stage(schedule, 0) == 'Stage 1/3: 8x8 from step 0'
  assert progressive.describe_stage(schedule, 1) == (
      'Stage 2/3: 16x16 from step 100 (fade-in over 50 steps)')
  config = grown_config()
  assert progressive.schedule_from_config(config) == progressive.Schedule((8, 16, 32), (1, 2), 1)
  assert progressive.schedule_from_config(tiny_config()) is None


@pytest.mark.parametrize('field,value,message', [
    ('model.progressive_resolutions', (16, 64), 'must double at each stage'),
    ('model.progressive_resolutions', (4, 8, 16, 32), 'from 8 px or more'),
    ('model.progressive_resolutions', (8, 16), 'up to data.resolution=32'),
    ('model.progressive_resolutions', (32,), 'must double at each stage'),
    ('train.progressive_stage_steps', (2,), 'the 2 stages after the first'),
    ('train.progressive_stage_steps', (2, 1), 'increasing'),
    ('train.progressive_stage_steps', (0, 2), 'above 0'),
    ('train.progressive_stage_steps', (2, 4), 'below train.num_steps=4'),
    ('train.progressive_fade_steps', 2, 'the shortest stage after the first \\(1 steps\\)'),
    ('train.progressive_fade_steps', -1, 'out of range'),
])
def test_bad_progressive_settings_name_the_fix(field, value, message):
  config = grown_config()
  section, name = field.split('.')
  setattr(config[section], name, value)
  with pytest.raises(ConfigError, match=message) as error:
    config_check.check_config(config)
  assert f'--config.{field}' in str(error.value)
  assert len(str(error.value).splitlines()) == 1


def test_stage_steps_without_resolutions_are_refused():
  config = tiny_config()
  config.train.progressive_stage_steps = (2,)
  with pytest.raises(ConfigError, match='model.progressive_resolutions is empty: set'):
    config_check.check_config(config)


# ----------------------------------------------------------------------------------------------
# The input stream of a stage.


def test_a_stage_stream_serves_its_resolution_and_continues_the_stream(fake_fashion_mnist_dir):
  """From the same position a stage's stream yields the same examples (and flips) at its size,
  framed as at 32 px: Fashion-MNIST's 28 px images padded to 32, then area-resized."""
  config = grown_config(fake_fashion_mnist_dir)
  config.data.random_flip = True
  full = input_pipeline.create_train_iterator(config, seed=0)
  next(full)
  position = full.position
  expected = next(full)
  for res in (8, 16):
    stage = input_pipeline.create_train_iterator(config, seed=0, position=position,
                                                 resolution=res)
    batch = next(stage)
    assert batch['image'].shape == (1, 8, res, res, 1)
    np.testing.assert_array_equal(batch['label'], expected['label'])
    k = 32 // res
    pooled = expected['image'].reshape(1, 8, res, k, res, k, 1).mean(axis=(3, 5))
    np.testing.assert_allclose(batch['image'], pooled, atol=1e-5)
    assert stage.position == full.position
