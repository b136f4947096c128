"""Progressive growing: the grown networks against the fixed ones, the schedule, the stages'
training and data, an exact resume across a stage change, and the config errors.

The networks are run op by op (no compiles). The training runs go through
train_loop.train_and_evaluate on 16 and 32 px without attention (the cheapest two-stage model):
one uninterrupted run of 4 steps (stage 2 from step 2, a fade-in of 2 steps) that also saves step
1, and a run resumed from that checkpoint alone, past the stage change (tests/test_resume.py
stops runs with SIGTERM; here only the resume matters). They compile the initial state and the
two stages' steps once; the second run hits the compilation cache.
"""

import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sagan_jax import checkpointing
from sagan_jax import config_check
from sagan_jax import input_pipeline
from sagan_jax import layers
from sagan_jax import models
from sagan_jax import progressive
from sagan_jax import sharding
from sagan_jax import train_loop
from sagan_jax import train_state
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


# ----------------------------------------------------------------------------------------------
# Training through a stage change (train_loop.train_and_evaluate), 16 -> 32 px.

STAGE_1_STEP = 1  # A checkpoint inside stage 1, resumed in a second run.


def loop_config(data_dir):
  config = grown_config(data_dir, stages=(16, 32))
  config.model.g_attention, config.model.d_attention = (), ()
  config.data.random_flip = True  # Their random numbers must replay too.
  config.train.ema_start_step = 0  # The EMA moves from the first step.
  config.checkpoint_every_steps = 0  # Saves at the end only (and at STAGE_1_STEP, below).
  config.sample_every_steps = 100  # A grid at the last step only.
  return config


class _Lines(logging.Handler):

  def __init__(self):
    super().__init__()
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def read_state(runs, name, step):
  manager = checkpointing.open_for_reading(checkpointing.checkpoint_dir(runs[name]))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(runs['abstract']), data=ocp.args.JsonRestore()))
  return jax.device_get(restored['state']), restored['data']


@pytest.fixture(scope='module')
def runs(tmp_path_factory, fake_fashion_mnist_dir):
  base = tmp_path_factory.mktemp('progressive')
  config = loop_config(fake_fashion_mnist_dir)
  generator, discriminator = models.create_models(config)
  rng, mesh = jax.random.PRNGKey(config.seed), sharding.create_mesh()
  init = jax.device_get(train_state.create_sharded_train_state(config, generator, discriminator,
                                                               rng, mesh))
  abstract = checkpointing.abstract_like(
      lambda: train_state.create_train_state(config, generator, discriminator, rng),
      sharding.replicated(mesh))
  reference, chain = str(base / 'reference'), str(base / 'chain')
  lines, absl_logger = _Lines(), logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.addHandler(lines)
  absl_logger.setLevel(logging.INFO)
  try:
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(train_loop, '_save_due', lambda manager, config, step: step == STAGE_1_STEP)
      train_loop.train_and_evaluate(config, reference)
    # The run that stopped there: a workdir holding that checkpoint alone, resumed to the end.
    shutil.copytree(os.path.join(reference, 'checkpoints', str(STAGE_1_STEP)),
                    os.path.join(chain, 'checkpoints', str(STAGE_1_STEP)))
    train_loop.train_and_evaluate(config, chain)
  finally:
    absl_logger.removeHandler(lines)
    absl_logger.setLevel(level)
  return dict(config=config, init=init, abstract=abstract, reference=reference, chain=chain,
              lines=lines.lines)


def test_a_run_resumed_in_stage_1_ends_bit_identical_to_the_uninterrupted_one(runs):
  lines = runs['lines']
  assert lines.count('Stage 1/2: 16x16 from step 0') == 2  # The reference run, the resumed one.
  assert lines.count('Stage 2/2: 32x32 from step 2 (fade-in over 2 steps)') == 2
  assert f'Starting at step {STAGE_1_STEP} of 4' in ' '.join(lines)
  reference, reference_data = read_state(runs, 'reference', 4)
  resumed, data = read_state(runs, 'chain', 4)
  assert data == reference_data and data['positions'][0] > 0
  assert_trees_equal(resumed, reference)
  final = reference
  assert float(final.g_state[models.PROGRESS]['alpha']) == 0.5  # Step index 3 of a 2-step fade.
  assert float(final.d_state[models.PROGRESS]['alpha']) == 0.5


# G's and D's layers that stage 1 (16 px) does not reach.
UNREACHED = {'g': ('block2', 'bn_out', 'conv_out'), 'd': ('block0',)}
STAGE_1 = {'g': ('block1', 'conv_out_16'), 'd': ('from_rgb_16', 'block1')}


def net_parts(state, net, names):
  """The named layers' parameters, Adam moments and mutable state of G or D in a state dict."""
  params = getattr(state, f'{net}_params')
  adam = getattr(state, f'{net}_opt_state')[0]
  collections = getattr(state, f'{net}_state')
  parts = {'params': {n: params[n] for n in names},
           'mu': {n: adam.mu[n] for n in names}, 'nu': {n: adam.nu[n] for n in names},
           'state': {c: {n: v[n] for n in names if n in v} for c, v in collections.items()
                     if c != models.PROGRESS}}
  if net == 'g':
    parts['ema'] = {n: state.ema_g_params[n] for n in names}
  return parts


def changed(a, b):
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_stage_1_leaves_the_layers_it_does_not_reach_as_they_were(runs):
  """Zero gradients, zero Adam moments, no update; the EMA stays equal to them; then the second
  stage trains them (from the values stage 1 left: the whole state carries over)."""
  init = runs['init']
  stage_1, _ = read_state(runs, 'reference', STAGE_1_STEP)
  final, _ = read_state(runs, 'reference', 4)
  for net, names in UNREACHED.items():
    before, after = net_parts(init, net, names), net_parts(stage_1, net, names)
    assert_trees_equal(after['params'], before['params'])
    assert_trees_equal(after['state'], before['state'])
    for moment in ('mu', 'nu'):
      assert not any(np.any(x) for x in jax.tree.leaves(after[moment]))
    if net == 'g':
      assert_trees_equal(after['ema'], after['params'])
    assert changed(net_parts(final, net, names)['params'], after['params'])
  for net, names in STAGE_1.items():
    assert changed(net_parts(stage_1, net, names)['params'], net_parts(init, net, names)['params'])


def test_a_progressive_checkpoint_restores_the_generator_of_its_stage(runs):
  """The evaluate and sample tools' restore: the final checkpoint gives the last stage; step 1's
  gives stage 1, sampling 32 px images made of 2x2 blocks."""
  z = jax.random.normal(jax.random.PRNGKey(0), (4, runs['config'].model.z_dim))
  labels = jnp.array([1, 8, 0, 3])
  _, generator, params, g_state, step = checkpointing.load_generator(runs['reference'])
  assert step == 4 and generator.stage == 32 and generator.stages == (16, 32)
  images = generator.apply({'params': params, **g_state}, z, labels, train=False)
  assert images.shape == (4, 32, 32, 1) and float(jnp.std(images)) > 0
  _, generator, params, g_state, step = checkpointing.load_generator(runs['chain'], STAGE_1_STEP)
  assert (step, generator.stage, generator.output_resolution) == (STAGE_1_STEP, 16, 32)
  images = generator.apply({'params': params, **g_state}, z, labels, train=False)
  np.testing.assert_array_equal(images, layers.upsample_2x(images[:, ::2, ::2]))
