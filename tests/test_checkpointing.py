"""Checkpoints across device counts, write failures, and the workdir check."""

import errno
import os

import jax
import numpy as np
import pytest

from sagan_jax import checkpointing
from sagan_jax import models
from sagan_jax import sharding
from sagan_jax import train
from sagan_jax import train_loop
from sagan_jax.errors import ConfigError
from sagan_jax.errors import TrainingError
from tests.conftest import tiny_config


@pytest.fixture(scope='module')
def setup():
  config = tiny_config()
  generator, discriminator = models.create_models(config)
  rng = jax.random.PRNGKey(3)

  def abstract(mesh):
    return checkpointing.abstract_like(
        lambda: train.create_train_state(config, generator, discriminator, rng),
        sharding.replicated(mesh))

  state = train.create_sharded_train_state(config, generator, discriminator, rng,
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


def test_a_checkpoint_of_another_width_is_refused_with_the_fields_named(setup, tmp_path):
  config, state, abstract = setup
  manager = checkpointing.create_checkpoint_manager(tmp_path, config)
  checkpointing.save(manager, state, config)
  manager.wait_until_finished()
  other = tiny_config()
  other.model.ch = 16
  with pytest.raises(ConfigError, match='model.ch is 8 there and 16 here'):
    checkpointing.restore_latest(manager, abstract(sharding.create_mesh()), other)
  assert manager.all_steps() == [0]  # Nothing moved or deleted.


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


def test_saves_come_every_k_steps_and_every_t_minutes_whichever_is_first(monkeypatch):
  config = tiny_config()
  config.checkpoint_every_steps = 100
  config.checkpoint_every_minutes = 2.0
  now = [1000.0]
  monkeypatch.setattr(train_loop.time, 'monotonic', lambda: now[0])
  clock = train_loop._SaveClock(config)
  due = []
  for step in range(1, 301):
    now[0] += 7.0  # 7 s per step: 120 s pass every 17.1 steps.
    if clock.due(step):
      due.append(step)
      clock.saved()
  assert due[:3] == [18, 36, 54] and 100 in due and 200 in due
  config.checkpoint_every_minutes = 0.0  # Steps only.
  clock = train_loop._SaveClock(config)
  now[0] += 1e6
  assert [s for s in range(1, 301) if clock.due(s)] == [100, 200, 300]
