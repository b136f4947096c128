"""The one error type users see: a wrong setting, named together with its fix."""


class ConfigError(ValueError):
  """Bad user input (config, data path, workdir). `main` prints it as one line, no traceback."""


class TrainingError(RuntimeError):
  """Training cannot go on (a non-finite loss, say). `main` prints it as one line, exit code 3."""


def first_line(error: BaseException, limit: int = 300) -> str:
  """The first line of `error`'s message, cut to `limit` characters: for one-line reports."""
  lines = str(error).splitlines()
  return (lines[0] if lines else type(error).__name__)[:limit]
