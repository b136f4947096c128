"""The one flag layer of the command-line tools (`python -m sagan_jax.TOOL`).

Every tool declares its flags in a `define_flags(flag_values)` function and starts through
`run_tool`, which:
- answers `--help` from the flag definitions alone, before jax or TensorFlow is imported (tools
  import them inside their functions);
- reads a training config with `--config` when the tool takes one (ml_collections config_flags,
  locked: `--config.model.ch=96` overrides a field, `--config=configs/imagenet.py:32` passes an
  argument); a config is named by its path or, from any directory, by the name of a config file
  installed with this package (`--config=imagenet`, `--config=fashion_mnist`);
- turns every mistake (an unknown flag or config field, a missing config file, a missing
  required flag, a ConfigError raised by the tool) into one `error: ...` line on stderr and exit
  code 2, a TrainingError into one line and exit code 3, before anything is written;
- quiets library start-up logs (TensorFlow's C++ logs, absl's pre-init warning, orbax's and
  clu's INFO lines, jax's backend probing); `--log_format=full` keeps absl's full format.

Names mean the same in every tool: --workdir is a training run's folder, --config a training
config, --out the one file a tool writes, --output_dir a folder it writes into, --json_out a JSON
copy of the numbers it prints, --batch_size the global batch over all devices.
"""

import contextlib
import glob
import logging as std_logging
import os
import sys
from typing import Callable, Optional, Sequence

from absl import flags
from absl import logging
from ml_collections import config_flags

from sagan_jax.errors import ConfigError
from sagan_jax.errors import TrainingError

HELP_FLAGS = ('-h', '--help', '--helpshort', '--helpfull', '-?')
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           'configs')
# Library INFO/WARNING lines that tell a user nothing about their run.
_QUIET_PATHS = ('/orbax/', '/clu/', '/jax/_src/xla_bridge.py', '/jax/_src/cloud_tpu_init.py')


def quiet_libraries(record) -> bool:
  """A log filter that drops INFO lines of orbax, clu and jax's backend probing; keeps the rest."""
  if record.levelno >= std_logging.ERROR:
    return True
  quiet_level = std_logging.WARNING if 'xla_bridge' in record.pathname else std_logging.INFO
  return record.levelno > quiet_level or not any(p in record.pathname for p in _QUIET_PATHS)


class _ShortFormatter(std_logging.Formatter):
  """'I 12:34:56 message': absl's level letter and the time, without date, thread and file."""

  def format(self, record) -> str:
    letter = 'DIWEF'[min(max(record.levelno // 10 - 1, 0), 4)]
    return f'{letter} {self.formatTime(record, "%H:%M:%S")} {record.getMessage()}'


def setup_logging(log_format: str = 'short') -> None:
  """INFO logs to stderr, library noise filtered; 'short' lines unless log_format is 'full'."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # absl's handler warns "before flag parsing" otherwise.
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if quiet_libraries not in handler.filters:
    handler.addFilter(quiet_libraries)
  handler.setFormatter(_ShortFormatter() if log_format == 'short' else
                       logging.PythonFormatter())


@contextlib.contextmanager
def quiet_stderr():
  """Closes file descriptor 2 for the block: C++ start-up lines that no log level reaches.

  TensorFlow's import (absl's "before absl::InitializeLog()" warning, oneDNN's notice) and
  libtpu's start-up (its TPU VM probing) write to stderr from C++ and ignore TF_CPP_MIN_LOG_LEVEL.
  Python exceptions still surface as what they are, once stderr is back.
  """
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def import_tensorflow() -> None:
  """Imports TensorFlow (tf.data, TensorBoard writers) without its C++ start-up lines.

  Its C++ logs stay at errors unless TF_CPP_MIN_LOG_LEVEL says otherwise.
  """
  if 'tensorflow' not in sys.modules:
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    with quiet_stderr():
      import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import


def config_names() -> Sequence[str]:
  """Names of the config files that ship with the package (`--config=NAME`)."""
  return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIGS_DIR, '*.py'))
                if not os.path.basename(p).startswith('_'))


def resolve_config_path(value: str) -> str:
  """`--config` as given, or the packaged configs/NAME.py for a bare name (`imagenet:32`)."""
  path, sep, arg = value.partition(':')
  if os.path.exists(path) or os.sep in path or path.endswith('.py'):
    return value
  packaged = os.path.join(CONFIGS_DIR, f'{path}.py')
  return packaged + sep + arg if os.path.isfile(packaged) else value


def _rewrite_config_arg(argv: Sequence[str]) -> list:
  out = list(argv[:1])
  for arg in argv[1:]:
    if arg.startswith('--config='):
      arg = '--config=' + resolve_config_path(arg[len('--config='):])
    out.append(arg)
  return out


def _one_line(text: str) -> str:
  return ' '.join(str(text).split())


def _config_load_error(argv: Sequence[str], error: BaseException) -> ConfigError:
  """The error of a config file that could not be loaded, as one line."""
  value = next((a[len('--config='):] for a in argv if a.startswith('--config=')), '')
  path = value.partition(':')[0]
  if path and not os.path.isfile(path):
    return ConfigError(f'config file {path!r} not found: pass --config=configs/NAME.py or one '
                       f'of the names {", ".join(config_names())}')
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return ConfigError(f'cannot load --config={value}: {lines[-1] if lines else error!r}')


def _define_all(argv: Sequence[str], define_flags, takes_config: bool) -> flags.FlagValues:
  """A FlagValues of its own (tools define flags of the same names) with every flag of a tool."""
  flag_values = flags.FlagValues()
  if takes_config:
    config_flags.DEFINE_config_file(
        'config', None, 'Training config: configs/NAME.py or one of the names '
        f'{", ".join(config_names())}; fields overridden as --config.train.batch_size=512.',
        flag_values=flag_values, lock_config=True, sys_argv=list(argv))
  flags.DEFINE_enum('log_format', 'short', ['short', 'full'], "Log lines: 'short' (level, time, "
                    "message) or 'full' (absl's format with date, thread and file).",
                    flag_values=flag_values)
  define_flags(flag_values)
  return flag_values


def parse_flags(argv: Sequence[str], define_flags: Callable[[flags.FlagValues], None],
                takes_config: bool, required: Sequence[str] = ()) -> flags.FlagValues:
  """Flags of one tool call on a FlagValues of their own; ConfigError for any mistake."""
  argv = _rewrite_config_arg(argv)
  flag_values = _define_all(argv, define_flags, takes_config)
  try:
    rest = flag_values(list(argv))
  except flags.UnrecognizedFlagError as e:
    name = e.flagname
    if name.startswith('config.'):
      raise ConfigError(f'the config has no field {name[len("config."):]!r}: see '
                        'configs/default.py for every field') from e
    raise ConfigError(f'unknown flag --{name}: see --help') from e
  except flags.Error as e:
    if str(e).startswith('flag --config='):
      raise _config_load_error(argv, e) from e
    raise ConfigError(f'{_one_line(e)}: see --help') from e
  except (AttributeError, KeyError) as e:  # An override of a field the config does not have.
    name = str(e).strip('"\'')
    field = next((a[len('--config.'):].split('=')[0] for a in argv
                  if a.startswith('--config.') and name in a), name)
    raise ConfigError(f'the config has no field {field!r}: see configs/default.py for every '
                      'field') from e
  except OSError as e:
    raise _config_load_error(argv, e) from e
  if len(rest) > 1:
    raise ConfigError(f'unexpected arguments {rest[1:]}: flags take the form --name=value')
  missing = [name for name in (('config',) if takes_config else ()) + tuple(required)
             if flag_values[name].value is None]
  if missing:
    raise ConfigError('missing ' + ', '.join(f'--{n}' for n in missing) + ': see --help')
  if takes_config:
    try:
      flag_values.config.get('seed')  # A config that failed to load raises on first use.
    except Exception as e:  # pylint: disable=broad-except  (a config file's own error)
      raise _config_load_error(argv, e) from e
  return flag_values


def check_flags(flag_values: flags.FlagValues, positive: Sequence[str] = (),
                non_negative: Sequence[str] = ()) -> None:
  """ConfigError naming the first numeric flag out of its range."""
  for names, low, what in ((positive, False, 'a positive number'),
                           (non_negative, True, '0 or a positive number')):
    for name in names:
      value = flag_values[name].value
      if value is not None and not (value >= 0 if low else value > 0):
        raise ConfigError(f'--{name}={value}: use {what}')


def _print_help(doc: str, define_flags, takes_config: bool, argv: Sequence[str]) -> None:
  help_text = _define_all(argv, define_flags, takes_config).get_help(include_special_flags=False)
  try:
    print(f'{doc.strip()}\n\nflags:\n{help_text}')
  except BrokenPipeError:  # `--help | head`.
    sys.stderr = open(os.devnull, 'w')  # pylint: disable=consider-using-with


def exit_if_help(doc: str, define_flags: Callable[[flags.FlagValues], None],
                 takes_config: bool = False) -> None:
  """Answers --help and exits, for a tool whose module loads jax and flax at the top.

  Such a module calls it under `if __name__ == '__main__':` before those imports (seconds), so
  `python -m sagan_jax.TOOL --help` answers at once.
  """
  if any(arg in HELP_FLAGS for arg in sys.argv[1:]):
    _print_help(doc, define_flags, takes_config, sys.argv)
    sys.exit(0)


def run_tool(doc: str, define_flags: Callable[[flags.FlagValues], None],
             tool_fn: Callable[[flags.FlagValues], Optional[int]],
             argv: Optional[Sequence[str]] = None, takes_config: bool = False,
             required: Sequence[str] = ()) -> int:
  """Runs one tool call: parse the flags, call `tool_fn(flag_values)`, one line per error.

  Args:
    doc: the tool's usage text (its module docstring), printed by --help.
    define_flags: defines the tool's flags on the FlagValues it is given.
    tool_fn: the tool itself; returns an exit code or None for 0.
    argv: the command line, program name first (default sys.argv).
    takes_config: whether the tool reads a training config (`--config`, required).
    required: flags without a default that must be given.

  Returns:
    The exit code: 0, 2 for bad input (ConfigError), 3 when training cannot go on.
  """
  argv = list(sys.argv if argv is None else argv)
  if any(arg in HELP_FLAGS for arg in argv[1:]):
    _print_help(doc, define_flags, takes_config, argv)
    return 0
  try:
    flag_values = parse_flags(argv, define_flags, takes_config, required)
    setup_logging(flag_values.log_format)
    return tool_fn(flag_values) or 0
  except (ConfigError, TrainingError) as e:
    logging.flush()
    print(f'error: {_one_line(e)}', file=sys.stderr)
    return 2 if isinstance(e, ConfigError) else 3
