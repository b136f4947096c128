"""The compiled train step: sharding invariance, one compile, D's loss, EMA, state updates."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sagan_jax import losses
from sagan_jax import models
from sagan_jax import sharding
from sagan_jax import train
from sagan_jax.errors import ConfigError
from tests.conftest import tiny_config


def make_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  res, b = config.data.resolution, config.train.batch_size
  shape = (config.train.d_steps, b, res, res, config.data.channels)
  return {'image': rng.uniform(-1, 1, shape).astype(np.float32),
          'label': rng.integers(0, config.data.num_classes, shape[:2]).astype(np.int32)}


@pytest.fixture(scope='module')
def setup():
  assert jax.device_count() == 8, 'tests run with --xla_force_host_platform_device_count=8'
  config = tiny_config()
  # Adam's first update is lr * sign(g). G's conv biases that feed a batch norm have a zero gradient
  # in exact arithmetic; the default eps (1e-8) would blow their float noise up to +-lr, and that
  # noise depends on the reduction order. eps = 1e-4 keeps noise at noise size.
  config.train.adam_eps = 1e-4
  generator, discriminator = models.create_models(config)
  mesh8 = sharding.create_mesh()
  mesh1 = sharding.create_mesh(jax.devices()[:1])
  step_fn = chex.assert_max_traces(train.create_train_step(config, generator, discriminator,
                                                           mesh8), n=1)
  step8 = train.compile_train_step(step_fn, mesh8)
  step1 = train.compile_train_step(
      train.create_train_step(config, generator, discriminator, mesh1), mesh1)
  rng = jax.random.PRNGKey(0)
  state0 = jax.device_get(train.create_sharded_train_state(config, generator, discriminator, rng,
                                                           mesh1))
  batch = make_batch(config)
  state1, metrics1 = step1(
      train.create_sharded_train_state(config, generator, discriminator, rng, mesh1),
      sharding.make_global_batch(batch, mesh1))
  state8, metrics8 = step8(
      train.create_sharded_train_state(config, generator, discriminator, rng, mesh8),
      sharding.make_global_batch(batch, mesh8))
  return dict(config=config, generator=generator, discriminator=discriminator, mesh8=mesh8,
              step8=step8, state0=state0, batch=batch, state1=jax.device_get(state1),
              metrics1=jax.device_get(metrics1), state8=state8, metrics8=jax.device_get(metrics8))


def test_step_on_8_devices_equals_step_on_1_device(setup):
  for key, value in setup['metrics1'].items():
    np.testing.assert_allclose(setup['metrics8'][key], value, rtol=1e-5, atol=1e-5, err_msg=key)
  leaves1 = jax.tree_util.tree_leaves_with_path(setup['state1'])
  leaves8 = jax.tree.leaves(jax.device_get(setup['state8']))
  assert len(leaves1) == len(leaves8)
  for (path, a), b in zip(leaves1, leaves8):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_batch_and_state_are_sharded_as_declared(setup):
  batch = sharding.make_global_batch(setup['batch'], setup['mesh8'])
  assert batch['image'].sharding.spec == jax.sharding.PartitionSpec(None, 'data')
  assert len(batch['image'].addressable_shards) == 8
  assert batch['image'].addressable_shards[0].data.shape[1] == 1
  assert setup['state8'].step.sharding.is_fully_replicated


def test_step_compiles_once(setup):
  mesh = setup['mesh8']
  # A copy: the step donates its input state.
  state = jax.device_put(jax.device_get(setup['state8']), sharding.replicated(mesh))
  for seed in range(3):  # New data, new step numbers: no retrace (assert_max_traces(n=1)).
    batch = sharding.make_global_batch(make_batch(setup['config'], seed), mesh)
    state, _ = setup['step8'](state, batch)
  assert int(state.step) == 4
  assert setup['step8']._cache_size() == 1  # pylint: disable=protected-access


def test_d_step_lowers_d_loss_on_its_batch(setup):
  """D's loss on the step's real batch and fakes is lower with the updated D parameters."""
  config, state0, state1 = setup['config'], setup['state0'], setup['state1']
  generator, discriminator = setup['generator'], setup['discriminator']
  batch_size = config.train.batch_size
  step_rng = jax.random.fold_in(state0.rng, 0)
  z, fake_labels = train.sample_latents(jax.random.fold_in(step_rng, 0), batch_size,
                                        config.model.z_dim, config.data.num_classes)
  fake, _ = generator.apply({'params': state0.g_params, **state0.g_state}, z, fake_labels,
                            train=True, mutable=['batch_stats', 'spectral'])
  images = jnp.concatenate([setup['batch']['image'][0], fake])
  labels = jnp.concatenate([setup['batch']['label'][0], fake_labels])

  def d_loss(d_params):
    logits = discriminator.apply({'params': d_params, **state1.d_state}, images, labels,
                                 update_sn=False)
    return float(losses.hinge_d_loss(*jnp.split(logits, 2)))

  before, after = d_loss(state0.d_params), d_loss(state1.d_params)
  assert after < before - 1e-3, (before, after)


def test_mutable_state_and_ema_advance(setup):
  config, state0, state1 = setup['config'], setup['state0'], setup['state1']
  for net in ('g_state', 'd_state'):
    u0 = jax.tree.leaves(getattr(state0, net)['spectral'])
    u1 = jax.tree.leaves(getattr(state1, net)['spectral'])
    assert all(not np.allclose(a, b) for a, b in zip(u0, u1)), net
  assert not np.allclose(state0.g_state['batch_stats']['bn_out']['mean'],
                         state1.g_state['batch_stats']['bn_out']['mean'])
  # Step 0 < ema_start_step: the EMA copies G; later it averages with ema_decay.
  chex.assert_trees_all_equal(state1.ema_g_params, state1.g_params)
  state2 = jax.device_get(setup['step8'](
      jax.device_put(state1, sharding.replicated(setup['mesh8'])),
      sharding.make_global_batch(make_batch(config, 7), setup['mesh8']))[0])
  decay = config.train.ema_decay
  expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state1.ema_g_params,
                          state2.g_params)
  chex.assert_trees_all_close(state2.ema_g_params, expected, rtol=1e-6, atol=1e-7)


def test_batch_that_does_not_divide_over_devices_names_the_fix(setup):
  with pytest.raises(ConfigError, match='batch_size=12 does not divide over 8 devices.*multiple '
                     'of 8'):
    sharding.check_batch_size(12, setup['mesh8'])
