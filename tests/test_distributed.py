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


_CACHE_SCRIPT = """
import sys
import jax
import jax.numpy as jnp
from sagan_jax import distributed
distributed.set_compilation_cache(sys.argv[1])
print('%.5f' % float(jax.jit(lambda x: jnp.sin(x) * 2)(jnp.float32(1.0))))
"""


def test_compilation_cache_is_written_and_read_by_a_restarted_process(tmp_path):
  """config.compilation_cache_dir: the first process compiles and writes the cache; a second
  one with the same program finds it (jax logs the cache hit) and writes nothing new."""
  cache = tmp_path / 'xla_cache'
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_COMPILATION_CACHE',
                                                                  'JAX_PERSISTENT_CACHE'))}
  env.update(JAX_PLATFORMS='cpu', JAX_DEBUG_LOG_MODULES='jax._src.compiler')
  runs = [subprocess.run([sys.executable, '-c', _CACHE_SCRIPT, str(cache)], cwd=_ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=True)
          for _ in range(2)]
  assert [r.stdout.strip() for r in runs] == ['1.68294'] * 2
  entries = sorted(os.listdir(cache))
  assert entries, runs[0].stderr[-2000:]
  assert 'cache hit' in runs[1].stderr.lower(), runs[1].stderr[-3000:]
  assert sorted(os.listdir(cache)) == entries


def test_no_compilation_cache_when_unset():
  before = jax.config.jax_compilation_cache_dir
  distributed.set_compilation_cache(None)
  distributed.set_compilation_cache('')
  assert jax.config.jax_compilation_cache_dir == before
