"""config.cpu_devices: the host's CPU split into several JAX devices before JAX starts."""

import os
import subprocess
import sys

import jax
import pytest

from sagan_jax import distributed
from sagan_jax.errors import ConfigError

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = """
import jax
from sagan_jax import distributed
distributed.set_cpu_devices(3)
print(len(jax.devices()), jax.devices()[0].platform)
distributed.set_cpu_devices(3)  # The count it already has: nothing to say.
distributed.set_cpu_devices(2)  # Too late: JAX has started; warns and keeps 3.
print(len(jax.devices()))
"""


def test_set_cpu_devices_splits_the_cpu_before_jax_starts():
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  result = subprocess.run([sys.executable, '-c', _SCRIPT], cwd=_ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=True)
  assert result.stdout.split() == ['3', 'cpu', '3']
  assert result.stderr.count('not applied') == 1
  assert 'config.cpu_devices=2 not applied: JAX started before the config was read' in (
      result.stderr)


def test_xla_flags_take_precedence(caplog):
  # conftest forces 8 host devices through XLA_FLAGS: an explicit choice that cpu_devices keeps.
  before = jax.config.jax_num_cpu_devices
  with caplog.at_level('INFO'):
    distributed.set_cpu_devices(2)
  assert jax.config.jax_num_cpu_devices == before
  assert len(jax.devices()) == 8
  assert 'XLA_FLAGS sets the host device count' in caplog.text


def test_zero_is_the_default_and_negative_counts_are_refused():
  distributed.set_cpu_devices(0)
  assert len(jax.devices()) == 8
  with pytest.raises(ConfigError, match='use 0'):
    distributed.set_cpu_devices(-1)
