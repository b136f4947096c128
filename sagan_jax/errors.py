"""The one error type users see: a wrong setting, named together with its fix."""


class ConfigError(ValueError):
  """Bad user input (config, data path, workdir). `main` prints it as one line, no traceback."""
