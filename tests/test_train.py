"""The compiled train step: sharding invariance, one compile, D's loss, EMA, state updates,
gradient accumulation and mixed precision."""

import copy
import functools

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sagan_jax import config_check
from sagan_jax import latents
from sagan_jax import losses
from sagan_jax import models
from sagan_jax import schedules
from sagan_jax import sharding
from sagan_jax import train
from sagan_jax import train_state
from sagan_jax.errors import ConfigError
from sagan_jax.errors import TrainingError
from sagan_jax.layers import SPECTRAL
from tests import tolerances
from tests.conftest import tiny_config
from tests.tolerances import EPS32

G_MUTABLE = ['batch_stats', SPECTRAL]


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
  # Glorot init, not the demo's orthogonal one: an orthogonal W has every singular value 1, so
  # each spectral-norm vector u is already a fixed point of the power iteration and step 1 could
  # not show it advancing (test_mutable_state_and_ema_advance).
  config.model.init = 'xavier'
  generator, discriminator = models.create_models(config)
  mesh8 = sharding.create_mesh()
  mesh1 = sharding.create_mesh(jax.devices()[:1])
  step_fn = chex.assert_max_traces(train.create_train_step(config, generator, discriminator,
                                                           mesh8), n=1)
  step8 = train.compile_train_step(step_fn, mesh8)
  step1 = train.compile_train_step(
      train.create_train_step(config, generator, discriminator, mesh1), mesh1)
  rng = jax.random.PRNGKey(0)
  state0 = jax.device_get(train_state.create_sharded_train_state(config, generator,
                                                                 discriminator, rng, mesh1))
  batch = make_batch(config)
  state1, metrics1 = step1(
      train_state.create_sharded_train_state(config, generator, discriminator, rng, mesh1),
      sharding.make_global_batch(batch, mesh1))
  state8, metrics8 = step8(
      train_state.create_sharded_train_state(config, generator, discriminator, rng, mesh8),
      sharding.make_global_batch(batch, mesh8))
  return dict(config=config, generator=generator, discriminator=discriminator, mesh8=mesh8,
              step8=step8, mesh1=mesh1, step1=step1, state0=state0, batch=batch,
              state1=jax.device_get(state1), metrics1=jax.device_get(metrics1), state8=state8,
              metrics8=jax.device_get(metrics8))


def step_latents(config, state, index):
  """The latents of the step's D step `index` (G step: index d_steps), as train_step draws them."""
  step_rng = jax.random.fold_in(state.rng, state.step)
  return latents.sample_latents(jax.random.fold_in(step_rng, index), config.train.batch_size,
                                config.model.z_dim, config.data.num_classes)


def trace_d_step(setup, state, real, real_labels):
  """The layer records (tests/tolerances.py) of the first D step of a train step from `state`."""
  config, generator, discriminator = setup['config'], setup['generator'], setup['discriminator']
  z, fake_labels = step_latents(config, state, 0)
  fake, _ = jax.jit(functools.partial(generator.apply, train=True, mutable=G_MUTABLE))(
      {'params': state.g_params, **state.g_state}, z, fake_labels)
  images = jnp.concatenate([real, fake])
  labels = jnp.concatenate([real_labels, fake_labels])
  d_loss = losses.get_adversarial_loss(config.train.loss).d_loss

  def loss(d_params, traced):
    logits = traced('d', lambda: discriminator.apply(
        {'params': d_params, **state.d_state}, images, labels, update_sn=True,
        mutable=[SPECTRAL])[0])
    return d_loss(*jnp.split(logits, 2))

  return tolerances.trace_layers(loss, state.d_params)


def trace_g_step(setup, state, d_params, d_state):
  """The layer records of the G step of a train step from `state`, D being (d_params, d_state)."""
  config, generator, discriminator = setup['config'], setup['generator'], setup['discriminator']
  z, labels = step_latents(config, state, config.train.d_steps)
  g_loss = losses.get_adversarial_loss(config.train.loss).g_loss

  def loss(g_params, traced):
    fake = traced('g', lambda: generator.apply({'params': g_params, **state.g_state}, z, labels,
                                               train=True, mutable=G_MUTABLE)[0])
    return g_loss(traced('d', lambda: discriminator.apply(
        {'params': d_params, **d_state}, fake, labels, update_sn=False)))

  return tolerances.trace_layers(loss, state.g_params)


def flat(tree):
  return flax.traverse_util.flatten_dict(jax.device_get(tree), sep='/')


def assert_gradients_agree(grads_a, grads_b, abs_terms, n, net):
  """Two float32 computations of one gradient: each element is a sum whose terms, in any order
  and each computed with reductions of at most n terms, differ by rounding alone."""
  grads_a, grads_b = flat(grads_a), flat(grads_b)
  assert set(grads_a) == set(abs_terms), sorted(set(grads_a) ^ set(abs_terms))
  for key, terms in abs_terms.items():
    tolerances.assert_within(grads_b[key], grads_a[key],
                             2 * tolerances.probabilistic_sum_bound(terms, n),
                             f'{net} gradient {key}')


def assert_adam_first_step(config, net, before, after, lr_scale=1.0):
  """`after` holds Adam's first step from `before` for the gradient in its own moments.

  With beta1 = 0 the first moment is the gradient g itself, the second (1 - beta2) g^2, and the
  update lr mu / (sqrt(nu / (1 - beta2)) + eps): its float32 computation is within a few
  roundings of the float64 one (3 eps of the update), adding it to the weight within u |p|.
  """
  train_config = config.train
  assert train_config.beta1 == 0.0
  opt_before, opt_after = getattr(before, f'{net}_opt_state')[0], getattr(after,
                                                                          f'{net}_opt_state')[0]
  assert int(opt_before.count) == 0 and int(opt_after.count) == 1
  lr = float(np.float32(getattr(train_config, f'{net}_lr')))
  # The constants as optax forms them in float32.
  nu_factor = float(np.float32(1 - train_config.beta2))
  bias_correction = float(np.float32(1) - np.float32(train_config.beta2))
  eps = float(np.float32(train_config.adam_eps))
  params_before, params_after = (flat(getattr(s, f'{net}_params')) for s in (before, after))
  mu, nu = flat(opt_after.mu), flat(opt_after.nu)
  for key, p0 in params_before.items():
    m = mu[key].astype(np.float64)
    np.testing.assert_array_equal(flat(opt_before.mu)[key], 0.0)
    # nu = fl(c * fl(g * g)): two roundings, together at most eps relative (2 eps allowed).
    tolerances.assert_within(nu[key], nu_factor * m**2, 2 * EPS32 * nu_factor * m**2,
                             f'{net} nu {key}')
    update = -lr_scale * lr * m / (np.sqrt(nu[key] / bias_correction) + eps)
    expected = p0.astype(np.float64) + update
    tolerances.assert_within(params_after[key], expected,
                             EPS32 * np.abs(expected) + 3 * EPS32 * np.abs(update),
                             f'{net} parameter {key}')


@pytest.fixture(scope='module')
def traced_step(setup):
  """Layer records of the step from state0 on setup's batch (G step: D after the 1-device run's
  D step)."""
  state0, state1, batch = setup['state0'], setup['state1'], setup['batch']
  return dict(d=trace_d_step(setup, state0, batch['image'][0], batch['label'][0]),
              g=trace_g_step(setup, state0, state1.d_params, state1.d_state))


def assert_same_step(config, state0, records, runs, nets=('d', 'g')):
  """Two computations (state, metrics) of one train step from state0 agree to float32 rounding.

  Their reductions (batch norm statistics, batch sums of gradients, means of losses) run in other
  orders, so every comparison has a tolerance from the sums of absolute terms of the step,
  computed from its layers' inputs and output cotangents (tests/tolerances.py): two orders of a
  sum differ by at most twice its probabilistic rounding bound, n the step's longest reduction.
  G's step also sees D's updated weights, which differ between the runs by that rounding carried
  through Adam: of the same order, inside the bound. The parameters follow from the gradients:
  each run's must be Adam's first step for its own gradient, to a few roundings of the update
  (compared to the size of the update, not to the weights). Step counters, the rng and the EMA
  copy (decay 0 before ema_start_step) are exact. Returns the metrics it compared.
  """
  (state_a, metrics_a), (state_b, metrics_b) = runs
  compared = {'train/all_finite'}
  bound = lambda terms, n: 2 * tolerances.probabilistic_sum_bound(terms, n)
  assert int(state_a.step) == int(state_b.step) == int(state0.step) + 1
  np.testing.assert_array_equal(state_a.rng, state_b.rng)
  assert bool(metrics_a['train/all_finite']) and bool(metrics_b['train/all_finite'])
  for net in nets:
    params, spectral = getattr(state0, f'{net}_params'), getattr(state0, f'{net}_state')[SPECTRAL]
    n = tolerances.longest_reduction(records[net])
    grad_terms = tolerances.gradient_abs_terms(records[net], net, params, spectral, True)
    grads = [getattr(s, f'{net}_opt_state')[0].mu for s in (state_a, state_b)]
    assert_gradients_agree(*grads, grad_terms, n, net)
    for state in (state_a, state_b):
      assert_adam_first_step(config, net, state0, state)
    # ||g||: the gradients' differences plus the rounding of a sum of squares.
    norms = [float(m[f'train/{net}_grad_norm']) for m in (metrics_a, metrics_b)]
    grad_bounds = [bound(t, n) for t in grad_terms.values()]
    squares = sum(np.sum(np.asarray(g, np.float64)**2) for g in flat(grads[0]).values())
    num_params = sum(np.size(t) for t in grad_terms.values())
    assert abs(norms[0] - norms[1]) <= (
        np.sqrt(sum(np.sum(b**2) for b in grad_bounds)) +
        bound(squares, num_params) / (2 * np.sqrt(squares))), (net, norms)
    compared.add(f'train/{net}_grad_norm')
    # The power iteration (one per step) on the same weights.
    for key, terms in tolerances.power_iteration_abs_terms(records[net], net, params,
                                                           spectral).items():
      tolerances.assert_within(flat(getattr(state_b, f'{net}_state')[SPECTRAL])[key],
                               flat(getattr(state_a, f'{net}_state')[SPECTRAL])[key],
                               bound(terms, n), f'{net} spectral {key}')
  if 'g' in nets:
    n = tolerances.longest_reduction(records['g'])
    for key, terms in tolerances.batch_stats_abs_terms(
        records['g'], 'g', state0.g_state['batch_stats']).items():
      tolerances.assert_within(flat(state_b.g_state['batch_stats'])[key],
                               flat(state_a.g_state['batch_stats'])[key], bound(terms, n),
                               f'G batch_stats {key}')
    assert int(state0.step) < config.train.ema_start_step  # The EMA is a copy of G.
    for state in (state_a, state_b):
      chex.assert_trees_all_equal(state.ema_g_params, state.g_params)
    # L_G = -E[D(G(z))]: the mean of the logits' absolute terms, D after the D step.
    logit_terms = tolerances.logit_abs_terms(records['g'], 'd', state_a.d_params,
                                             state_a.d_state[SPECTRAL], False)
    tolerances.assert_within(metrics_b['train/g_loss'], metrics_a['train/g_loss'],
                             bound(np.mean(logit_terms), n), 'train/g_loss')
    compared.add('train/g_loss')
  if 'd' in nets:
    n = tolerances.longest_reduction(records['d'])
    logit_terms = np.split(tolerances.logit_abs_terms(
        records['d'], 'd', state0.d_params, state0.d_state[SPECTRAL], True), 2)
    # Hinge: E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]; the constants 1 are terms too.
    for key, terms in (('d_real', np.mean(logit_terms[0])), ('d_fake', np.mean(logit_terms[1])),
                       ('d_loss', 2 + np.mean(logit_terms[0]) + np.mean(logit_terms[1]))):
      tolerances.assert_within(metrics_b[f'train/{key}'], metrics_a[f'train/{key}'],
                               bound(terms, n), f'train/{key}')
      compared.add(f'train/{key}')
  return compared


def test_step_on_8_devices_equals_step_on_1_device(setup, traced_step):
  assert set(setup['metrics1']) == set(setup['metrics8'])
  compared = assert_same_step(setup['config'], setup['state0'], traced_step,
                              [(setup['state1'], setup['metrics1']),
                               (jax.device_get(setup['state8']), setup['metrics8'])])
  assert compared == set(setup['metrics1'])  # Every metric, and (above) every state array.


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


def test_d_step_lowers_d_loss_on_its_batch(setup, traced_step):
  """D's loss on the step's real batch and fakes is lower with the updated D parameters."""
  config, state0, state1 = setup['config'], setup['state0'], setup['state1']
  generator, discriminator = setup['generator'], setup['discriminator']
  batch_size = config.train.batch_size
  step_rng = jax.random.fold_in(state0.rng, 0)
  z, fake_labels = latents.sample_latents(jax.random.fold_in(step_rng, 0), batch_size,
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
  # Lower by more than the rounding of the two losses (bounded by the logits' absolute terms).
  logit_terms = tolerances.logit_abs_terms(traced_step['d'], 'd', state0.d_params,
                                           state0.d_state[SPECTRAL], True)
  rounding = 2 * tolerances.probabilistic_sum_bound(2 + np.mean(logit_terms),
                                                    tolerances.longest_reduction(traced_step['d']))
  assert after < before - rounding, (before, after, rounding)


def test_mutable_state_and_ema_advance(setup):
  config, state0, state1 = setup['config'], setup['state0'], setup['state1']
  for net in ('g_state', 'd_state'):
    u0 = jax.tree.leaves(getattr(state0, net)['spectral'])
    u1 = jax.tree.leaves(getattr(state1, net)['spectral'])
    # A unit u of one element (D's linear output, fan_out 1) is already the fixed point.
    assert all(not np.allclose(a, b) for a, b in zip(u0, u1) if a.size > 1), net
    # It stays a unit, to the 2 roundings of x / (|x| + eps).
    assert all(abs(abs(float(b.item())) - 1) <= 2 * EPS32 for b in u1 if b.size == 1), net
  assert not np.allclose(state0.g_state['batch_stats']['bn_out']['mean'],
                         state1.g_state['batch_stats']['bn_out']['mean'])
  # Step 0 < ema_start_step: the EMA copies G; later it averages with ema_decay.
  chex.assert_trees_all_equal(state1.ema_g_params, state1.g_params)
  state2 = jax.device_get(setup['step8'](
      jax.device_put(state1, sharding.replicated(setup['mesh8'])),
      sharding.make_global_batch(make_batch(config, 7), setup['mesh8']))[0])
  # decay e + (1 - decay) p with float32 constants, as the step forms them: its two roundings
  # (of the products and of the sum) are at most eps of the terms' absolute sum (2 eps allowed).
  decay = np.float32(config.train.ema_decay)
  weights = (float(decay), float(np.float32(1) - decay))
  ema_before, ema_after, g_params = (flat(t) for t in (state1.ema_g_params, state2.ema_g_params,
                                                       state2.g_params))
  for key, e in ema_before.items():
    e, p = e.astype(np.float64), g_params[key].astype(np.float64)
    tolerances.assert_within(ema_after[key], weights[0] * e + weights[1] * p,
                             2 * EPS32 * (weights[0] * np.abs(e) + weights[1] * np.abs(p)),
                             f'EMA {key}')


def test_step_hooks_reach_both_steps_and_regularizers_enter_the_losses(setup):
  """StepHooks: `augment` sees every image D scores (D step: real and fake; G step: fake), and
  the regularizers' terms and metrics join D's and G's losses."""
  config, generator, discriminator = setup['config'], setup['generator'], setup['discriminator']
  mesh, seen, g_weight = setup['mesh1'], [], 1e-3

  def augment(rng, images):  # Zeros without a gradient: G's adversarial gradient vanishes.
    del rng
    seen.append(images.shape)  # At trace time: once per step kind.
    return jax.lax.stop_gradient(jnp.zeros_like(images))

  def d_regularizer(inputs, rng):  # A gradient of 1e6 on D's output bias.
    del rng
    return 1e6 * jnp.sum(inputs.params['linear']['bias']), {
        'train/d_seen_max': jnp.max(jnp.abs(inputs.images))}

  def g_regularizer(inputs, rng):  # g_weight |W|^2 of G's input layer: gradient 2 g_weight W.
    del rng
    return g_weight * jnp.sum(jnp.square(inputs.params['linear']['kernel'])), {
        'train/g_seen_max': jnp.max(jnp.abs(inputs.images))}

  hooks = train.StepHooks(augment, (d_regularizer,), (g_regularizer,))
  step = train.compile_train_step(
      train.create_train_step(config, generator, discriminator, mesh, hooks=hooks), mesh)
  before = setup['state0']
  after, metrics = jax.device_get(step(
      train_state.create_sharded_train_state(config, generator, discriminator,
                                             jax.random.PRNGKey(0), mesh),
      sharding.make_global_batch(setup['batch'], mesh)))
  b, res, c = config.train.batch_size, config.data.resolution, config.data.channels
  assert config.train.d_steps == 1
  assert seen == [(2 * b, res, res, c), (b, res, res, c)]
  assert metrics['train/d_seen_max'] == 0 and metrics['train/g_seen_max'] == 0
  # G's gradient is the regularizer's alone: its norm, a sum of n squares, within gamma_(n + 3).
  kernel = np.asarray(before.g_params['linear']['kernel'], np.float64)
  expected = np.linalg.norm(2 * g_weight * kernel)
  assert abs(metrics['train/g_grad_norm'] - expected) <= tolerances.gamma(kernel.size + 3) * (
      expected)
  # D's bias gradient is 1e6 + O(1): Adam's first step (beta1 = 0) moves it by d_lr (1 - 1e-10).
  assert config.train.beta1 == 0.0
  bias_before = np.asarray(before.d_params['linear']['bias'])
  bias_after = np.asarray(after.d_params['linear']['bias'])
  lr = config.train.d_lr
  tolerances.assert_within(bias_after, bias_before - lr, 2 * EPS32 * (np.abs(bias_before) + lr),
                           'D bias after the regularized step')


def test_skip_mode_keeps_the_state_of_a_non_finite_step(setup):
  """on_nonfinite='skip': an infinite G learning rate makes the step non-finite; it is undone."""
  config = copy.deepcopy(setup['config'])
  config.train.on_nonfinite = 'skip'
  config.train.g_lr = float('inf')
  generator, discriminator, mesh = setup['generator'], setup['discriminator'], setup['mesh1']
  step = train.compile_train_step(train.create_train_step(config, generator, discriminator, mesh),
                                  mesh)
  state = train_state.create_sharded_train_state(config, generator, discriminator,
                                                 jax.random.PRNGKey(0), mesh)
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
  with pytest.raises(ConfigError, match='grad_accum_steps=3 micro-batches.*multiple of 3'):
    config_check.check_config(config, setup['mesh8'])


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
  return dict(state0=state0, k1=run(setup['step1']), k4=run(step4),
              traced_d=trace_d_step(setup, state0, setup['batch']['image'][0],
                                    setup['batch']['label'][0]))


def test_accumulated_d_update_equals_large_batch_update(setup, accumulation):
  """D has no batch statistics: the mean of 4 micro-batch gradients is the batch gradient."""
  (state1, metrics1), (state4, _) = accumulation['k1'], accumulation['k4']
  assert abs(float(metrics1['train/d_fake'])) > 1e-3  # The fakes are not blank.
  # The same sums in another order (micro-batch means, then their mean): D's gradients, update,
  # optimizer state and metrics within the rounding bounds of the step's terms.
  assert_same_step(setup['config'], accumulation['state0'], {'d': accumulation['traced_d']},
                   [accumulation['k1'], accumulation['k4']], nets=('d',))
  # One power iteration per D step, as without accumulation.
  chex.assert_trees_all_equal(state4.d_state, state1.d_state)


def test_accumulated_g_step_keeps_spectral_vectors_and_first_bn_mean(
    setup, accumulation, traced_step):
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
  bn1, bn4 = (s.g_state['batch_stats']['block0']['bn1'] for s in (state1, state4))
  # Rounding bounds from the sums of absolute terms of the new moving statistics (the float32
  # step's G trace: this state0 differs only in G's last BN). The BN's input, linear(z), is a
  # z_dim-term dot product per example; its statistics sum over batch x 4 x 4 values: n is the
  # longer of the two reductions.
  n = max(setup['config'].model.z_dim, setup['config'].train.batch_size * 4 * 4)
  terms = tolerances.batch_stats_abs_terms(traced_step['g'], 'g',
                                           state0.g_state['batch_stats'])
  mean_bound, var_bound = (2 * tolerances.probabilistic_sum_bound(terms[f'block0/bn1/{m}'], n)
                           for m in ('mean', 'var'))
  tolerances.assert_within(bn4['mean'], bn1['mean'], mean_bound, 'block0/bn1 moving mean')
  assert np.all(bn4['var'] <= bn1['var'] + var_bound)
  assert np.any(bn4['var'] < bn1['var'] - var_bound)  # Micro-batch means do differ.


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

  bf16 keeps 8 significant bits (unit roundoff u = 2^-8, about 0.4%). The difference comes from
  rounding the same float32 values (inputs, weights, layer outputs) to bf16, which every machine
  does alike (round to nearest even); the float32 arithmetic around it changes with the CPU by
  about 1e-7, which moves a bf16 rounding only at a tie. So these margins, measured, hold on any
  CPU, while bounds derived from the step's absolute terms (tests/tolerances.py) are vacuous here
  (for L_G: 34 in the linearized worst case, 0.57 probabilistic, against 0.019 measured). A loss
  passes through about 10 rounded layers of G and then D: we allow 1% of the logit scale (|D(x)|
  is about 6.5 here) for losses and logit means, and 2% for the gradient norms (measured: 0.3%
  and 0.4%). Adam's first update is about lr * sign(grad), so the update directions are
  compared: cosine >= 0.98 for D (measured 0.995); >= 0.85 for G (measured 0.92), whose
  gradients are sums with far more cancellation (a kernel's largest sum of absolute terms is 50 to
  100 times its largest gradient, against 2 to 10 in D), so that bf16's error flips the sign of
  more of them. BN moving statistics: within 1e-3 (measured 2e-4).
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
  assert schedules.lr_scale_fn(config.train) is None  # 0: constant rates (the paper).
  config.train.lr_decay_start_step = 10
  assert schedules.lr_scale_fn(config.train) is None  # Starts after the last step.
  config.train.lr_decay_start_step = 6
  scale = schedules.lr_scale_fn(config.train)
  np.testing.assert_allclose([float(scale(jnp.int32(s))) for s in (0, 5, 6, 7, 8, 9)],
                             [1.0, 1.0, 1.0, 0.75, 0.5, 0.25])
  config.train.lr_decay_end_factor = 0.5  # To half the rates instead of zero.
  scale = schedules.lr_scale_fn(config.train)
  np.testing.assert_allclose([float(scale(jnp.int32(s))) for s in (5, 6, 7, 8, 9, 10)],
                             [1.0, 1.0, 0.875, 0.75, 0.625, 0.5])
  # Equal settings give equal (hashable) factors, so their step contexts share a compiled step.
  assert schedules.lr_scale_fn(config.train) == scale and hash(scale) == hash(
      schedules.lr_scale_fn(config.train))
  config.train.lr_decay_start_step = -1
  with pytest.raises(ConfigError, match='lr_decay_start_step=-1: use 0'):
    schedules.lr_scale_fn(config.train)


def test_uniform_ema_is_the_mean_of_g_from_its_start_step():
  """train.ema_average: the step's update e <- d e + (1 - d) p with ema_decay_fn's d, run over 20
  G steps of random 'weights' p, copies G before ema_start_step (3) and then keeps ema_decay
  ('exponential') or the mean of the weights after steps 3 to 19 ('uniform')."""
  config = tiny_config()
  config.train.ema_decay, config.train.ema_start_step = 0.9, 3
  weights = np.random.default_rng(0).normal(size=(20, 64)).astype(np.float32)

  def run(kind):
    config.train.ema_average = kind
    decay_fn, ema = schedules.ema_decay_fn(config.train), np.zeros(64, np.float32)
    decays = []
    for step, p in enumerate(weights):  # `step`: state.step before the G step, as g_step has it.
      d = decay_fn(jnp.int32(step))
      decays.append(float(d))
      ema = np.asarray(d * ema + (1 - d) * p)
    return decays, ema

  decays, _ = run('exponential')
  assert decays == [0.0] * 3 + [float(np.float32(0.9))] * 17
  decays, ema = run('uniform')
  assert decays[:4] == [0.0] * 4 and decays[4:7] == [1 / 2, float(np.float32(2 / 3)), 3 / 4]
  # Each update rounds d, 1 - d, both products and the sum: at most 5 roundings of eps / 2 of
  # |e| + |p| <= 2 max|p|, carried on (times d < 1) by the 16 updates after the first copy.
  tolerances.assert_within(ema, weights[3:].astype(np.float64).mean(axis=0),
                           16 * 5 * EPS32 / 2 * 2 * np.abs(weights).max(), 'uniform EMA')
  config.train.ema_average = 'mean'
  with pytest.raises(ConfigError, match="unknown train.ema_average 'mean'.*'uniform'"):
    config_check.check_config(config)


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

  def assert_halved(net, full, half, records):
    # Each run moves by Adam's first step for its own gradient, the decayed one at half the rate
    # (to a few roundings of the update), and the gradients, hence the Adam moments, agree within
    # the rounding bounds of the step's terms.
    assert_adam_first_step(config, net, start, full)
    assert_adam_first_step(config, net, start, half, lr_scale=0.5)
    assert_gradients_agree(
        getattr(full, f'{net}_opt_state')[0].mu, getattr(half, f'{net}_opt_state')[0].mu,
        tolerances.gradient_abs_terms(records, net, getattr(start, f'{net}_params'),
                                      getattr(start, f'{net}_state')[SPECTRAL], True),
        tolerances.longest_reduction(records), net)

  # The whole step: D's update is halved, its Adam moments (same gradients) are unchanged.
  (full, full_metrics), (half, half_metrics) = run(setup['step1']), run(compile_step(config))
  assert float(half_metrics['train/lr_scale']) == 0.5
  assert 'train/lr_scale' not in full_metrics
  assert_halved('d', full, half, trace_d_step(setup, start, setup['batch']['image'][0],
                                              setup['batch']['label'][0]))
  # G alone (in the whole step G's gradient also sees the halved D update).
  full, _ = run(compile_step(setup['config'], ('g',)))
  half, _ = run(compile_step(config, ('g',)))
  assert_halved('g', full, half, trace_g_step(setup, start, start.d_params, start.d_state))
