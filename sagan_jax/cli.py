"""What the command-line tools share: quiet library logs and config-file flag parsing."""

import logging as std_logging

from absl import flags
from absl import logging
from ml_collections import config_flags

from sagan_jax.errors import ConfigError


def quiet_libraries(record) -> bool:
  """A log filter that drops INFO lines of orbax and clu (dozens per checkpoint); keeps the rest."""
  return record.levelno > std_logging.INFO or not any(
      part in record.pathname for part in ('/orbax/', '/clu/'))


def setup_cli_logging() -> None:
  """INFO logs to stderr for the CLIs, without orbax's and clu's INFO lines (dozens per restore)."""
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(quiet_libraries)


def config_flag_values(argv) -> flags.FlagValues:
  """A FlagValues of its own (CLIs define flags of the same names) with --config and --out."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'The training config (its data section).',
                                  flag_values=fv, lock_config=True, sys_argv=list(argv))
  flags.DEFINE_string('out', None, 'Output .npz (local or gs://).', flag_values=fv)
  return fv


def parse_config_cli(fv, argv, doc: str):
  """Parses `argv` into `fv` (flags --config and --out among them); one ConfigError per mistake.

  Shared by the CLIs that take a training config: the classifier and reference_stats.
  """
  if any(arg in ('-h', '--help') for arg in argv[1:]):
    print(f'{doc}\nflags:\n{fv.get_help()}')
    raise SystemExit(0)
  try:
    fv(list(argv))
  except flags.Error as e:
    raise ConfigError(f'{e}: see --help') from e
  except (AttributeError, KeyError) as e:  # A --config.FIELD override of no field.
    raise ConfigError(f'the config has no field {e}: see configs/default.py') from e
  if fv.config is None or not fv.out:
    raise ConfigError('pass --config=configs/<data set>.py and --out=PATH')
  return fv
