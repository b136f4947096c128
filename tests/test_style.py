"""The linter (flake8, configured in setup.cfg) and the shell scripts' syntax."""

import ast
import glob
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flake8_is_clean():
  result = subprocess.run([sys.executable, '-m', 'flake8', 'sagan_jax', 'configs', 'tests'],
                          cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def test_shell_scripts_parse():
  launch = os.path.join(REPO, 'launch')
  scripts = (glob.glob(os.path.join(launch, '*.sh')) + glob.glob(os.path.join(launch, '*.sbatch')) +
             [os.path.join(REPO, '.ci', 'run')])
  assert len(scripts) >= 7
  for script in scripts:
    result = subprocess.run(['bash', '-n', script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f'{script}: {result.stderr}'


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules():
  modules = glob.glob(os.path.join(REPO, 'sagan_jax', '**', '*.py'), recursive=True)
  assert len(modules) > 20
  return modules


def test_no_module_is_over_400_lines():
  long = {}
  for path in _modules():
    with open(path) as f:
      count = sum(1 for _ in f)
    if count > MAX_MODULE_LINES:
      long[os.path.relpath(path, REPO)] = count
  assert not long, f'modules over {MAX_MODULE_LINES} lines (split them): {long}'


def test_no_function_is_over_60_lines():
  long = {}
  for path in _modules():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        count = node.end_lineno - node.lineno + 1
        if count > MAX_FUNCTION_LINES:
          long[f'{os.path.relpath(path, REPO)}:{node.lineno} {node.name}'] = count
  assert not long, f'functions over {MAX_FUNCTION_LINES} lines (split them): {long}'
