"""The compiled train step: sharding invariance, one compile, D's loss, EMA, state updates,
gradient accumulation and mixed precision."""

import copy
import functools

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
from sagan_jax.errors import TrainingError
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
              step8=step8, mesh1=mesh1, step1=step1, state0=state0, batch=batch,
              state1=jax.device_get(state1), metrics1=jax.device_get(metrics1), state8=state8,
              metrics8=jax.device_get(metrics8))


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
  # Jitted: op-by-op dispatch of G and D takes several times as long as one compile.
  generate = jax.jit(functools.partial(generator.apply, train=True,
                                       mutable=['batch_stats', 'spectral']))
  fake, _ = generate({'params': state0.g_params, **state0.g_state}, z, fake_labels)
  images = jnp.concatenate([setup['batch']['image'][0], fake])
  labels = jnp.concatenate([setup['batch']['label'][0], fake_labels])

  @jax.jit
  def d_loss(d_params):
    logits = discriminator.apply({'params': d_params, **state1.d_state}, images, labels,
                                 update_sn=False)
    return losses.hinge_d_loss(*jnp.split(logits, 2))

  before, after = float(d_loss(state0.d_params)), float(d_loss(state1.d_params))
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


def test_skip_mode_keeps_the_state_of_a_non_finite_step(setup):
  """on_nonfinite='skip': an infinite G learning rate makes the step non-finite; it is undone."""
  config = copy.deepcopy(setup['config'])
  config.train.on_nonfinite = 'skip'
  config.train.g_lr = float('inf')
  generator, discriminator, mesh = setup['generator'], setup['discriminator'], setup['mesh1']
  step = train.compile_train_step(train.create_train_step(config, generator, discriminator, mesh),
                                  mesh)
  state = train.create_sharded_train_state(config, generator, discriminator, jax.random.PRNGKey(0),
                                           mesh)
  before = jax.device_get(state)
  after, metrics = jax.device_get(step(state, sharding.make_global_batch(setup['batch'], mesh)))
  assert not metrics['train/all_finite'] and int(after.step) == 1
  # D's update was finite, but the whole step is undone: D and G and all their state as before.
  chex.assert_trees_all_equal((after.g_params, after.d_params, after.g_state, after.d_state,
                               after.ema_g_params, after.d_opt_state),
                              (before.g_params, before.d_params, before.g_state, before.d_state,
                               before.ema_g_params, before.d_opt_state))


def test_non_finite_guard_counts_skips_or_stops_naming_the_step():
  from sagan_jax import train_loop  # pylint: disable=g-import-not-at-top

  class Manager:
    def wait_until_finished(self):
      pass

    def latest_step(self):
      return 40

  bad, good = {'train/all_finite': np.bool_(False)}, {'train/all_finite': np.bool_(True)}
  guard = train_loop._NonFiniteGuard('skip', skips=3)  # 3 from the checkpoint's metadata.
  for step, metrics in ((41, good), (42, bad), (42, bad), (43, bad)):  # 42 seen twice: once.
    guard.check(step, metrics, Manager())
  assert guard.skips == 5
  with pytest.raises(TrainingError, match='at step 42; the newest checkpoint .step 40. is the '
                     'last good one.*on_nonfinite=skip'):
    train_loop._NonFiniteGuard('stop').check(42, bad, Manager())
  with pytest.raises(ConfigError, match="unknown train.on_nonfinite 'retry'"):
    train.check_on_nonfinite('retry')


def test_batch_that_does_not_divide_over_devices_names_the_fix(setup):
  with pytest.raises(ConfigError, match='batch_size=12 does not divide over 8 devices.*multiple '
                     'of 8'):
    sharding.check_batch_size(12, setup['mesh8'])


def test_batch_that_does_not_split_into_micro_batches_names_the_fix(setup):
  with pytest.raises(ConfigError, match='batch_size=16 does not split into 4 micro-batches on '
                     'each of 8 devices.*multiple of 32.*grad_accum_steps to a divisor of 2'):
    sharding.check_batch_size(16, setup['mesh8'], grad_accum_steps=4)
  sharding.check_batch_size(32, setup['mesh8'], grad_accum_steps=4)
  config = copy.deepcopy(setup['config'])
  config.train.grad_accum_steps = 3
  with pytest.raises(ConfigError, match='multiple of 24'):
    train.create_train_step(config, setup['generator'], setup['discriminator'], setup['mesh8'])


def test_micro_batches_keep_each_devices_examples(setup):
  """Micro-batch i takes examples i, i + k, ...: each device's micro-batch rows are its own."""
  mesh = setup['mesh8']
  x = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)  # 4 examples per device, k = 2.
  sharded = jax.device_put(x, sharding.data_sharding(mesh))
  split = jax.jit(lambda x: train.split_micro_batches(x, 2),
                  out_shardings=sharding.step_batch_sharding(mesh))
  hlo = split.lower(sharded).compile().as_text()
  assert not any(op in hlo for op in ('all-to-all', 'all-gather', 'collective-permute'))
  out = split(sharded)
  np.testing.assert_array_equal(out, np.stack([x[0::2], x[1::2]]))
  for shard in out.addressable_shards:
    device_rows = x[4 * mesh.devices.tolist().index(shard.device):][:4]
    np.testing.assert_array_equal(np.asarray(shard.data).reshape(-1, 3),
                                  np.concatenate([device_rows[0::2], device_rows[1::2]]))


@pytest.fixture(scope='module')
def accumulation(setup):
  """One step with grad_accum_steps = 4 (micro-batches of 2) and with 1, from the same state.

  G's last BN gets gamma = 0 and beta = 1: its output, hence every fake image, is then the same
  whatever the batch statistics, so D sees identical examples in both runs even though G's batch
  norms see 2 examples at a time with accumulation.
  """
  config = copy.deepcopy(setup['config'])
  config.train.grad_accum_steps = 4
  mesh = setup['mesh1']
  step4 = train.compile_train_step(
      train.create_train_step(config, setup['generator'], setup['discriminator'], mesh), mesh)
  g_params = jax.tree.map(np.array, setup['state0'].g_params)
  g_params['bn_out']['gamma'][:] = 0.0
  g_params['bn_out']['beta'][:] = 1.0
  state0 = setup['state0'].replace(g_params=g_params)
  batch = sharding.make_global_batch(setup['batch'], mesh)
  run = lambda step: jax.device_get(step(jax.device_put(state0, sharding.replicated(mesh)), batch))
  return dict(state0=state0, k1=run(setup['step1']), k4=run(step4))


def test_accumulated_d_update_equals_large_batch_update(accumulation):
  """D has no batch statistics: the mean of 4 micro-batch gradients is the batch gradient."""
  (state1, metrics1), (state4, metrics4) = accumulation['k1'], accumulation['k4']
  assert abs(float(metrics1['train/d_fake'])) > 1e-3  # The fakes are not blank.
  for key in ('train/d_loss', 'train/d_real', 'train/d_fake', 'train/d_grad_norm'):
    np.testing.assert_allclose(metrics4[key], metrics1[key], rtol=1e-5, err_msg=key)
  # Float32 sums in another order: differences of a few roundings of the largest values.
  chex.assert_trees_all_close(state4.d_params, state1.d_params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state4.d_opt_state, state1.d_opt_state, rtol=1e-5, atol=1e-6)
  # One power iteration per D step, as without accumulation.
  chex.assert_trees_all_equal(state4.d_state, state1.d_state)


def test_accumulated_g_step_keeps_spectral_vectors_and_first_bn_mean(accumulation):
  """What holds for G, whose batch norms see one micro-batch at a time.

  G's gradient is the mean of micro-batch gradients, each with its own BN statistics, so G's
  update is not the large-batch one. Exactly equal: G's spectral vectors (the power iteration
  reads only W) and the moving mean of G's first BN, whose input (linear(z)) does not depend on
  other examples: the mean of micro-batch means is the batch mean. Its moving variance advances by
  the mean of micro-batch variances, which by the law of total variance is at most the batch
  variance.
  """
  state0, (state1, _), (state4, _) = (accumulation['state0'], accumulation['k1'],
                                      accumulation['k4'])
  chex.assert_trees_all_equal(state4.g_state['spectral'], state1.g_state['spectral'])
  bn0, bn1, bn4 = (s.g_state['batch_stats']['block0']['bn1'] for s in (state0, state1, state4))
  np.testing.assert_allclose(bn4['mean'], bn1['mean'], rtol=1e-5, atol=1e-7)
  var1, var4 = bn1['var'] - 0.9 * bn0['var'], bn4['var'] - 0.9 * bn0['var']  # 0.1 * variance.
  assert np.all(var4 <= var1 + 1e-7) and np.any(var4 < var1 - 1e-5)


@pytest.fixture(scope='module')
def bfloat16_step(setup):
  """One bf16 step from the float32 fixture's initial state and batch (parameters are shared)."""
  config = copy.deepcopy(setup['config'])
  config.model.dtype = 'bfloat16'
  generator, discriminator = models.create_models(config)
  mesh = setup['mesh1']
  step = train.compile_train_step(
      train.create_train_step(config, generator, discriminator, mesh), mesh)
  state = jax.device_put(setup['state0'], sharding.replicated(mesh))
  return jax.device_get(step(state, sharding.make_global_batch(setup['batch'], mesh)))


def test_bfloat16_state_stays_float32(bfloat16_step, setup):
  state, _ = bfloat16_step
  for name in ('g_params', 'd_params', 'g_state', 'd_state', 'g_opt_state', 'd_opt_state',
               'ema_g_params'):
    floats = [x for x in jax.tree.leaves(getattr(state, name))
              if np.issubdtype(x.dtype, np.floating)]  # Adam's step count is an integer.
    assert floats and all(x.dtype == np.float32 for x in floats), name
  # The power iteration runs in float32 on float32 weights: the same u as the float32 step.
  chex.assert_trees_all_equal(state.d_state, setup['state1'].d_state)
  chex.assert_trees_all_equal(state.g_state['spectral'], setup['state1'].g_state['spectral'])


def test_bfloat16_step_is_close_to_float32_step(bfloat16_step, setup):
  """Bounds on one bf16 step against the float32 step from the same state and batch.

  bf16 keeps 8 significant bits (unit roundoff 2^-9, about 0.2%). A loss passes through about 10
  rounded convolution/matmul layers of G and then D, so its error is a few roundoffs per layer:
  we allow 1% of the logit scale (|D(x)| is about 6.5 here) for losses and logit means, and 2% for
  the gradient norms (measured: 0.3% and 0.4%). Adam's first update is about lr * sign(grad), so
  the update directions are compared: cosine >= 0.98 for D (measured 0.995); >= 0.85 for G
  (measured 0.92), whose conv biases before batch norms have a zero gradient in exact arithmetic
  and get +-lr from rounding noise in either precision. BN moving statistics: within 1e-3.
  """
  state16, metrics16 = bfloat16_step
  state32, metrics32, state0 = setup['state1'], setup['metrics1'], setup['state0']
  scale = max(1.0, abs(float(metrics32['train/d_real'])), abs(float(metrics32['train/d_fake'])))
  for key in ('train/d_loss', 'train/d_real', 'train/d_fake', 'train/g_loss'):
    assert abs(float(metrics16[key]) - float(metrics32[key])) <= 0.01 * scale, key
  for key in ('train/d_grad_norm', 'train/g_grad_norm'):
    np.testing.assert_allclose(metrics16[key], metrics32[key], rtol=2e-2, err_msg=key)

  def update(state, name):
    new, old = jax.tree.leaves(getattr(state, name)), jax.tree.leaves(getattr(state0, name))
    return np.concatenate([np.ravel(a - b) for a, b in zip(new, old)])

  for name, min_cosine in (('d_params', 0.98), ('g_params', 0.85)):
    u16, u32 = update(state16, name), update(state32, name)
    cosine = u16 @ u32 / (np.linalg.norm(u16) * np.linalg.norm(u32))
    assert cosine >= min_cosine, (name, cosine)
  chex.assert_trees_all_close(state16.g_state['batch_stats'], state32.g_state['batch_stats'],
                              atol=1e-3)


def test_lr_scale_falls_linearly_to_zero_at_the_last_step():
  config = tiny_config()
  config.train.num_steps = 10
  assert train.lr_scale_fn(config.train) is None  # 0: constant rates (the paper).
  config.train.lr_decay_start_step = 10
  assert train.lr_scale_fn(config.train) is None  # Starts after the last step.
  config.train.lr_decay_start_step = 6
  scale = train.lr_scale_fn(config.train)
  np.testing.assert_allclose([float(scale(jnp.int32(s))) for s in (0, 5, 6, 7, 8, 9)],
                             [1.0, 1.0, 1.0, 0.75, 0.5, 0.25])
  config.train.lr_decay_start_step = -1
  with pytest.raises(ConfigError, match='lr_decay_start_step=-1: use 0'):
    train.lr_scale_fn(config.train)


def test_lr_decay_scales_both_updates_and_keeps_optimizer_states(setup):
  """At step 3 of 4 with the decay from step 2, D and G move half as far as without it."""
  config = copy.deepcopy(setup['config'])
  config.train.num_steps, config.train.lr_decay_start_step = 4, 2
  generator, discriminator, mesh = setup['generator'], setup['discriminator'], setup['mesh1']

  def compile_step(step_config, phases=('d', 'g')):
    return train.compile_train_step(
        train.create_train_step(step_config, generator, discriminator, mesh, phases), mesh)

  state0 = setup['state0']
  start = state0.replace(step=np.asarray(3, state0.step.dtype))
  batch = sharding.make_global_batch(setup['batch'], mesh)

  def run(step):
    return jax.device_get(step(jax.device_put(start, sharding.replicated(mesh)), batch))

  def moved(state, name):
    return jax.tree.map(lambda new, old: new - old, getattr(state, name), getattr(start, name))

  # The whole step: D's update is halved, its Adam moments (same gradients) are unchanged.
  (full, full_metrics), (half, half_metrics) = run(setup['step1']), run(compile_step(config))
  assert float(half_metrics['train/lr_scale']) == 0.5
  assert 'train/lr_scale' not in full_metrics
  chex.assert_trees_all_close(moved(half, 'd_params'),
                              jax.tree.map(lambda m: 0.5 * m, moved(full, 'd_params')),
                              atol=1e-7, rtol=1e-5)  # Float32 ulps of the weights.
  chex.assert_trees_all_close(half.d_opt_state, full.d_opt_state, rtol=1e-6)
  # G alone (in the whole step G's gradient also sees the halved D update).
  full, _ = run(compile_step(setup['config'], ('g',)))
  half, _ = run(compile_step(config, ('g',)))
  chex.assert_trees_all_close(moved(half, 'g_params'),
                              jax.tree.map(lambda m: 0.5 * m, moved(full, 'g_params')),
                              atol=1e-7, rtol=1e-5)  # Float32 ulps of the weights.
  chex.assert_trees_all_close(half.g_opt_state, full.g_opt_state, rtol=1e-6)
