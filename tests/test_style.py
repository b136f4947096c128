"""The linter (flake8, configured in setup.cfg) and the shell scripts' syntax."""

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
