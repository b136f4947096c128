"""Checkpoints across device counts, write failures, and the workdir check."""

import dataclasses
import datetime
import errno
import json
import logging
import os
import tarfile
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies
import pytest

from sagan_jax import checkpoint_shapes
from sagan_jax import checkpointing
from sagan_jax import models
from sagan_jax import sharding
from sagan_jax import train_state
from sagan_jax import train_loop
from sagan_jax.errors import ConfigError
from sagan_jax.errors import TrainingError
from tests import tolerances
from tests.conftest import tiny_config


class _Info(NamedTuple):
  """A checkpoint's step and time, as Orbax's save decision policies read them."""
  step: int
  time: datetime.datetime
  metrics: Any = None


@pytest.fixture(scope='module')
def setup():
  config = tiny_config()
  generator, discriminator = models.create_models(config)
  rng = jax.random.PRNGKey(3)

  def abstract(mesh):
    return checkpointing.abstract_like(
        lambda: train_state.create_train_state(config, generator, discriminator, rng),
        sharding.replicated(mesh))

  state = train_state.create_sharded_train_state(config, generator, discriminator, rng,
                                                 sharding.create_mesh(jax.devices()[:1]))
  return config, state, abstract


@pytest.mark.parametrize('save_devices,restore_devices', [(8, 1), (1, 8)])
def test_a_checkpoint_restores_onto_another_device_count(setup, tmp_path, save_devices,
                                                         restore_devices):
  config, state, abstract = setup
  assert jax.device_count() == 8
  save_mesh = sharding.create_mesh(jax.devices()[:save_devices])
  saved = jax.device_put(state, sharding.replicated(save_mesh))
  manager = checkpointing.create_checkpoint_manager(tmp_path, config)
  checkpointing.save(manager, saved, config, {'positions': [7]}, {'step': 0})
  manager.wait_until_finished()

  restore_mesh = sharding.create_mesh(jax.devices()[:restore_devices])
  restored = checkpointing.restore_latest(manager, abstract(restore_mesh), config)
  assert restored.data == {'positions': [7]} and restored.metadata == {'step': 0}
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored.state)):
    assert b.sharding.mesh.devices.size == restore_devices
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('field,value,message', [
    ('ch', 16, r'model.ch is 8 there and 16 here'),
    ('g_widths', (2, 4, 4, 4), r'model.g_widths is \[4, 4, 4, 4\] there and \[2, 4, 4, 4\] here'),
    ('d_widths', (4, 4, 4, 8), r'model.d_widths is \[4, 4, 4, 4\] there and \[4, 4, 4, 8\] here'),
    ('g_shared_embedding', 16, r'model.g_shared_embedding is 0 there and 16 here'),
])
def test_a_checkpoint_of_another_shape_is_refused_with_the_fields_named(setup, tmp_path, field,
                                                                        value, message):
  """Refused before Orbax tries (a failed restore would set every checkpoint aside)."""
  config, state, abstract = setup
  manager = checkpointing.create_checkpoint_manager(tmp_path, config)
  checkpointing.save(manager, state, config)
  manager.wait_until_finished()
  other = tiny_config()
  setattr(other.model, field, value)
  with pytest.raises(ConfigError, match=message):
    checkpointing.restore_latest(manager, abstract(sharding.create_mesh()), other)
  assert manager.all_steps() == [0]  # Nothing moved or deleted.
  # The table's own multipliers, spelled out, are the same model.
  other = tiny_config()
  other.model.g_widths, other.model.d_widths = (4, 4, 4, 4), [4, 4, 4, 4]
  checkpoint_shapes.check_compatible(json.loads(json.dumps(config.to_dict())), other, tmp_path)


def test_other_data_settings_restore_with_a_warning_that_names_them(setup, tmp_path, caplog):
  """The input position counts examples of the stream that seed and data.* give: with other
  values the run goes on (the model is the same) but says that its data order is not exact."""
  config, state, abstract = setup
  manager = checkpointing.create_checkpoint_manager(tmp_path, config)
  checkpointing.save(manager, state, config)
  manager.wait_until_finished()
  other = tiny_config()
  other.seed, other.data.max_examples = 1, 500
  with caplog.at_level(logging.WARNING):
    assert checkpointing.restore_latest(manager, abstract(sharding.create_mesh()), other)
    assert checkpointing.restore_latest(manager, abstract(sharding.create_mesh()), config)
  warnings = [r.getMessage() for r in caplog.records if 'other data settings' in r.getMessage()]
  assert len(warnings) == 1, warnings
  assert 'seed is 0 there and 1 here; data.max_examples is 0 there and 500 here' in warnings[0]
  # A config saved before data.max_examples existed read the whole split: the same stream as 0.
  saved = json.loads(json.dumps(config.to_dict()))
  del saved['data']['max_examples']
  assert checkpoint_shapes.stream_changes(saved, config) == []


def test_arrays_of_other_shapes_are_refused_even_when_no_field_says_so(setup, tmp_path,
                                                                       monkeypatch):
  """A model change that SHAPE_FIELDS misses (here: none listed) is still another model, not a
  damaged checkpoint: one ConfigError naming the arrays, and the checkpoint stays where it is."""
  config, state, abstract = setup
  manager = checkpointing.create_checkpoint_manager(tmp_path, config)
  checkpointing.save(manager, state, config)
  manager.wait_until_finished()
  other = tiny_config()
  other.model.ch = 16
  generator, discriminator = models.create_models(other)
  other_abstract = checkpointing.abstract_like(
      lambda: train_state.create_train_state(other, generator, discriminator,
                                             jax.random.PRNGKey(3)),
      sharding.replicated(sharding.create_mesh()))
  monkeypatch.setattr(checkpoint_shapes, 'SHAPE_FIELDS', ())
  with pytest.raises(ConfigError, match=r'another model \(step 0: g_params/attention16/g/kernel is '
                                        r'\(1, 1, 32, 16\) there and \(1, 1, 64, 32\) here; .* and '
                                        r'\d+ more\): pass the settings it was trained with'):
    checkpointing.restore_latest(manager, other_abstract, other)
  assert manager.all_steps() == [0]
  assert not (tmp_path / checkpointing.UNREADABLE_DIR).exists()
  # Its own model's arrays restore.
  assert checkpointing.restore_latest(manager, abstract(sharding.create_mesh()), config)


class _FullDisk:
  directory = '/full/checkpoints'

  def check_for_errors(self):
    pass

  def save(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')

  def latest_step(self):
    return 4


def test_a_failed_save_stops_training_with_the_newest_good_step(setup):
  config, state, _ = setup
  with pytest.raises(TrainingError) as error:
    train_loop._save(_FullDisk(), state, config, {}, {})
  message = str(error.value)
  assert 'could not write the checkpoint of step 0' in message
  assert 'No space left on device' in message and 'newest complete checkpoint is step 4' in message


def test_an_unwritable_workdir_is_a_config_error(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(ConfigError, match='cannot write to --workdir=.*Not a directory'):
    train_loop._check_workdir(checkpointing.epath.Path(blocker / 'run'))
  assert os.listdir(tmp_path) == ['file']


def test_saves_come_every_k_steps_and_every_t_minutes_whichever_is_first():
  config = tiny_config()
  config.checkpoint_every_steps = 100
  config.checkpoint_every_minutes = 2.0
  start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
  at = lambda step, seconds_per_step=7.0: _Info(step, start + datetime.timedelta(
      seconds=seconds_per_step * step))
  idle = policies.DecisionContext(is_saving_in_progress=False, reached_preemption=False,
                                  multiprocessing_options=ocp.options.MultiprocessingOptions())

  def due(policy, context=idle):
    saved = [_Info(0, start)]  # The checkpoint the run resumed from.
    for step in range(1, 301):  # 7 s per step: 120 s pass every 17.1 steps.
      if policy.should_save(at(step), saved, context=context):
        saved.append(at(step))
    return [info.step for info in saved[1:]]

  both = due(checkpointing.save_decision_policy(config))
  assert both[:3] == [18, 36, 54] and 100 in both and 200 in both
  # A save still being written holds the timed saves back, not the fixed-interval ones.
  busy = dataclasses.replace(idle, is_saving_in_progress=True)
  assert due(checkpointing.save_decision_policy(config), busy) == [100, 200, 300]
  preempted = dataclasses.replace(idle, reached_preemption=True)
  assert checkpointing.save_decision_policy(config).should_save(at(7), [at(6)], context=preempted)
  config.checkpoint_every_minutes = 0.0  # Steps only.
  assert due(checkpointing.save_decision_policy(config)) == [100, 200, 300]
  config.checkpoint_every_steps = 0  # Minutes only; a fresh run (no checkpoint) saves at once.
  config.checkpoint_every_minutes = 2.0
  policy = checkpointing.save_decision_policy(config)
  assert policy.should_save(at(1), [], context=idle)
  assert due(policy)[:3] == [18, 36, 54] and 100 not in due(policy)


def _sums_agree(arrays, expected, what):
  """Each array's float64 sum equals the recorded one within gamma_n of its sum of |terms|."""
  assert len(arrays) == len(expected), (what, len(arrays), len(expected))
  for array, (total, abs_total, shape) in zip(arrays, expected):
    assert list(array.shape) == shape, (what, array.shape, shape)
    bound = tolerances.gamma(array.size + 1, tolerances.EPS64) * abs_total
    assert abs(np.sum(array, dtype=np.float64) - total) <= bound, (what, shape)


def test_a_checkpoint_written_before_the_refactor_restores(tmp_path):
  """tests/fixtures/checkpoint_3e6fddf.tar.xz: 2 steps of the tiny config (ch 8, z_dim 8) written
  by commit 3e6fddf, before the train step, evaluation and checkpoint policies were reorganized;
  the _sums.json beside it holds each array's sum and sum of |x| read back by that commit."""
  fixtures = os.path.join(os.path.dirname(__file__), 'fixtures')
  with tarfile.open(os.path.join(fixtures, 'checkpoint_3e6fddf.tar.xz')) as archive:
    archive.extractall(tmp_path, filter='data')
  with open(os.path.join(fixtures, 'checkpoint_3e6fddf_sums.json')) as f:
    recorded = json.load(f)['leaves']
  config, generator, params, g_state, step = checkpointing.load_generator(tmp_path)
  assert step == 2 and config.model.z_dim == 8
  ema = flax.traverse_util.flatten_dict(jax.device_get(params), sep='/')
  _sums_agree([np.asarray(ema[k]) for k in sorted(ema)],
              [recorded[f'generator/ema_params/{k}'] for k in sorted(ema)], 'G EMA')
  images = generator.apply({'params': params, **g_state}, jnp.zeros((2, 8)),
                           jnp.arange(2, dtype=jnp.int32), train=False)
  assert images.shape == (2, 32, 32, 1) and bool(jnp.all(jnp.isfinite(images)))
  # The whole train state, restored into today's GANTrainState as a resumed run does.
  mesh = sharding.create_mesh(jax.devices()[:1])
  manager = checkpointing.create_checkpoint_manager(tmp_path, config)
  discriminator = models.create_models(config)[1]
  state, restored = train_loop._restore_or_create(config, manager, generator, discriminator, mesh)
  assert restored is not None and int(state.step) == 2
  assert restored.data == {'process_count': 1, 'positions': [16]}
  by_size = lambda item: item[:2]  # (shape, sum of |x|): the leaves' order in both lists.
  leaves = sorted(((tuple(np.shape(x)), float(np.sum(np.abs(np.asarray(x, np.float64)))),
                    np.asarray(x)) for x in jax.tree.leaves(jax.device_get(state))), key=by_size)
  expected = sorted(((tuple(shape), abs_total, [total, abs_total, shape])
                     for key, (total, abs_total, shape) in recorded.items()
                     if key.startswith('state/')), key=by_size)
  _sums_agree([leaf[2] for leaf in leaves], [e[2] for e in expected], 'train state')
