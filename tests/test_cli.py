"""Every `python -m sagan_jax.*` tool: --help, and one `error:` line with exit code 2 for bad input.

The table runs each tool's `main(argv)` in this process (the flag layer is the same one
`python -m` runs; a few subprocess cases prove that path too) and checks, for every bad
invocation: exit code 2, stderr ends with exactly one `error:` line that names the problem, no
traceback, and nothing written: no workdir for a config error, no output file.
"""

import os
import subprocess
import sys

from absl import flags
import pytest

from configs import cifar10
from configs import default
from configs import fashion_mnist
from configs import imagenet
from configs import imagenet256
from sagan_jax import benchmark
from sagan_jax import classifier
from sagan_jax import cli
from sagan_jax import config_check
from sagan_jax import evaluate
from sagan_jax import inception
from sagan_jax import main as train_main
from sagan_jax import reference_stats
from sagan_jax import sample
from sagan_jax.evaluation import registry
from tests.test_main import REPO
from tests.test_main import tiny_flags

TOOLS = {'main': train_main, 'evaluate': evaluate, 'sample': sample, 'benchmark': benchmark,
         'reference_stats': reference_stats, 'classifier': classifier, 'inception': inception}


@pytest.fixture(scope='module')
def files(tmp_path_factory, fake_fashion_mnist_dir):
  """Inputs for the bad invocations: data, corrupt files, a config file that raises."""
  base = tmp_path_factory.mktemp('cli')
  corrupt = base / 'corrupt.pth'
  corrupt.write_bytes(b'PK\x03\x04 not a zip file at all')
  raising = base / 'raising_config.py'
  raising.write_text('def get_config():\n  raise ValueError("no such data set here")\n')
  unreadable = base / 'unreadable' / 'train' / 'cat'
  unreadable.mkdir(parents=True)
  for i in range(4):
    (unreadable / f'{i}.jpg').write_bytes(b'\xff\xd8 truncated jpeg')
  return dict(base=str(base), data=fake_fashion_mnist_dir, corrupt=str(corrupt),
              raising=str(raising), unreadable=str(base / 'unreadable'))


def _train(f, *extra):
  return ['main', *tiny_flags(f['data'], os.path.join(f['base'], 'run'), 3), *extra]


FM = '--config=configs/fashion_mnist.py'
# (tool, argv builder, text the error line must contain)
CASES = [
    ('main', lambda f: ['main', '--config=configs/nope.py', f'--workdir={f["base"]}/run'],
     "config file 'configs/nope.py' not found"),
    ('main', lambda f: _train(f, '--config.train.bogus=1'),
     "the config has no field 'train.bogus'"),
    ('main', lambda f: _train(f, '--config.train.batch_size=0'), 'train.batch_size=0 is out of'),
    ('main', lambda f: _train(f, '--config.train.batch_size=-16'), 'train.batch_size=-16'),
    ('main', lambda f: _train(f, '--config.train.batch_size=abc'), 'batch_size'),
    ('main', lambda f: _train(f, '--config.train.num_steps=0'), 'train.num_steps=0'),
    ('main', lambda f: _train(f, '--config.train.d_steps=0'), 'train.d_steps=0'),
    ('main', lambda f: _train(f, '--config.train.grad_accum_steps=3'), 'micro-batches'),
    ('main', lambda f: _train(f, '--config.train.g_lr=-1e-4'), 'train.g_lr=-0.0001'),
    ('main', lambda f: _train(f, '--config.train.d_lr=inf'), 'train.d_lr=inf'),
    ('main', lambda f: _train(f, '--config.train.ema_decay=1.5'), 'train.ema_decay=1.5'),
    ('main', lambda f: _train(f, '--config.train.beta2=1'), 'train.beta2=1.0'),
    ('main', lambda f: _train(f, '--config.train.lr_decay_end_factor=1.5'),
     'train.lr_decay_end_factor=1.5 is out of range'),
    ('main', lambda f: _train(f, '--config.log_every_steps=0'), 'log_every_steps=0'),
    ('main', lambda f: _train(f, '--config.keep_checkpoints=0'), 'keep_checkpoints=0'),
    ('main', lambda f: _train(f, '--config.checkpoint_every_minutes=-5'),
     'checkpoint_every_minutes=-5'),
    ('main', lambda f: _train(f, '--config.data.resolution=48'), 'unknown resolution 48'),
    ('main', lambda f: _train(f, '--config.model.g_attention=(64,)'), 'G has no 64x64 feature'),
    ('main', lambda f: _train(f, '--config.model.dtype=float16'), "unknown model.dtype 'float16'"),
    ('main', lambda f: _train(f, '--config.train.loss=lsgan'), "unknown train.loss 'lsgan'"),
    ('main', lambda f: _train(f, '--config.data.name=mnist'), "unknown data.name 'mnist'"),
    ('main', lambda f: _train(f, "--config.eval.metrics=('fid','fjd')"), "unknown metric 'fjd'"),
    ('main', lambda f: _train(f, '--config.eval.best_metric=is_std'), 'cannot rank checkpoints'),
    ('main', lambda f: _train(f, '--config.data.fashion_mnist_dir=/nonexistent'),
     'apt-get install dataset-fashion-mnist'),
    ('main', lambda f: _train(f, '--config.train.batch_size=12'), 'does not divide over 8'),
    ('main', lambda f: ['main', f'--config={f["raising"]}', f'--workdir={f["base"]}/run'],
     'no such data set here'),
    ('main', lambda f: ['main', FM], 'missing --workdir'),
    ('main', lambda f: _train(f, '--bogus=1'), 'unknown flag --bogus'),
    ('main', lambda f: _train(f, 'extra'), "unexpected arguments ['extra']"),
    ('evaluate', lambda f: ['evaluate'], 'missing --workdir'),
    ('evaluate', lambda f: ['evaluate', f'--workdir={f["base"]}'], 'no checkpoint in'),
    ('evaluate', lambda f: ['evaluate', f'--workdir={f["base"]}', '--num_samples=many'],
     '--num_samples'),
    ('sample', lambda f: ['sample', f'--workdir={f["base"]}'], 'no checkpoint in'),
    ('benchmark', lambda f: ['benchmark', FM, '--steps=0'], '--steps=0'),
    ('benchmark', lambda f: ['benchmark', FM, '--phases=train'], "unknown --phases ['train']"),
    ('benchmark', lambda f: ['benchmark', FM, '--config.model.ch=0'], 'model.ch=0'),
    ('benchmark', lambda f: ['benchmark', FM, '--topology=v9-8'],
     'unknown --topology=v9-8: use one of v4-16'),
    ('benchmark', lambda f: ['benchmark', FM, '--max_batch'], 'add --topology=NAME'),
    ('benchmark', lambda f: ['benchmark', FM, f'--json_out={f["base"]}/nope/out.json'],
     'its folder does not exist'),
    ('reference_stats', lambda f: ['reference_stats', FM], 'missing --out'),
    ('reference_stats', lambda f: [
        'reference_stats', FM, f'--config.data.fashion_mnist_dir={f["data"]}',
        f'--inception_path={f["corrupt"]}', f'--out={f["base"]}/out.npz'],
     'cannot read FID Inception weights'),
    ('classifier', lambda f: ['classifier', f'--out={f["base"]}/out.npz'], 'missing --config'),
    ('classifier', lambda f: ['classifier', FM, '--epochs=0', f'--out={f["base"]}/out.npz'],
     '--epochs=0.0: use a positive number'),
    ('reference_stats', lambda f: ['reference_stats', FM, '--batch_size=-1',
                                   f'--out={f["base"]}/out.npz'], '--batch_size=-1'),
    ('sample', lambda f: ['sample', f'--workdir={f["base"]}', '--num_samples=-3'],
     '--num_samples=-3'),
    ('classifier', lambda f: [
        'classifier', FM, '--config.data.name=folder',
        f'--config.data.folder_dir={f["unreadable"]}',
        '--config.data.num_classes=1', '--config.data.channels=3', '--batch_size=2',
        f'--out={f["base"]}/out.npz'], 'no readable image'),
    ('inception', lambda f: ['inception', f'--inception_path={f["corrupt"]}'], 'missing --out'),
    ('inception', lambda f: ['inception', f'--inception_path={f["corrupt"]}',
                             f'--out={f["base"]}/out.npz'], 'cannot read FID Inception weights'),
]


def _check_one_error_line(code, err, message):
  assert code == 2, err[-2000:]
  assert 'Traceback' not in err, err[-2000:]
  lines = err.strip().splitlines()
  assert lines and lines[-1].startswith('error: ') and message in lines[-1], err[-2000:]
  assert sum(line.startswith('error:') for line in lines) == 1, err[-2000:]


@pytest.mark.parametrize('tool,make_argv,message', CASES,
                         ids=[f'{i:02d}-{c[0]}' for i, c in enumerate(CASES)])
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(files, capfd, tool,
                                                                make_argv, message):
  before = sorted(os.listdir(files['base']))
  code = TOOLS[tool].main(make_argv(files))
  _check_one_error_line(code, capfd.readouterr().err, message)
  assert sorted(os.listdir(files['base'])) == before  # No workdir, no output file.


def test_topology_without_libtpu_says_how_to_install_it(capfd):
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    pytest.skip('libtpu is importable here (make test keeps it in .venv/libtpu, off the path)')
  except ImportError:
    pass
  code = benchmark.main(['benchmark', FM, '--topology=v5e-8'])
  _check_one_error_line(code, capfd.readouterr().err, "pip install 'libtpu==0.0.42.*'")


def test_at_least_25_cases_cover_every_tool():
  assert len(CASES) >= 25 and {tool for tool, _, _ in CASES} == set(TOOLS)


@pytest.mark.parametrize('argv,message', [
    (['-m', 'sagan_jax.main', '--config=configs/nope.py', '--workdir=run'], 'not found'),
    # A config named, not given as a path: found from any directory.
    (['-m', 'sagan_jax.main', '--config=fashion_mnist', '--workdir=run',
      '--config.train.batch_size=0'], 'train.batch_size=0'),
    (['-m', 'sagan_jax.benchmark', '--config=fashion_mnist', '--bogus'],
     'unknown flag --bogus'),
])
def test_python_m_prints_one_line_without_traceback(tmp_path, argv, message):
  result = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, 'PYTHONPATH': REPO})
  _check_one_error_line(result.returncode, result.stderr, message)
  assert not os.listdir(tmp_path)


HELP_SCRIPT = """
import sys
from sagan_jax import cli
for name in sys.argv[1:]:
  module = __import__(f'sagan_jax.{name}', fromlist=['main'])
  assert module.main([name, '--help']) == 0, name
print('tensorflow imported:', 'tensorflow' in sys.modules)
"""


def test_help_of_every_tool_answers_without_tensorflow():
  result = subprocess.run([sys.executable, '-c', HELP_SCRIPT, *TOOLS], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'tensorflow imported: False' in result.stdout
  for flag in ('--workdir', '--config', '--out', '--steps', '--num_per_class', '--inception_path'):
    assert flag in result.stdout, flag
  assert result.stdout.count('--log_format') == len(TOOLS)  # The shared flag, in every tool.


HELP_AS_MAIN = """
import runpy, sys
sys.argv = ['prog', '--help']
try:
  runpy.run_module('sagan_jax.' + TOOL, run_name='__main__')
except SystemExit as e:
  assert not e.code, e.code
print('loaded:', sorted(m for m in ('jax', 'flax', 'tensorflow') if m in sys.modules))
"""


@pytest.mark.parametrize('tool', sorted(TOOLS))
def test_python_m_help_loads_neither_jax_nor_tensorflow(tool):
  """`python -m sagan_jax.TOOL --help` answers from the flag definitions alone (well under a
  second; jax's import alone takes one to two)."""
  script = HELP_AS_MAIN.replace('TOOL', repr(tool))
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'flags:' in result.stdout and 'loaded: []' in result.stdout, result.stdout[-500:]


def test_config_by_name_resolves_to_the_packaged_file():
  path = cli.resolve_config_path('imagenet:32')
  assert path == os.path.join(REPO, 'configs', 'imagenet.py') + ':32'
  assert cli.resolve_config_path('configs/imagenet.py') == 'configs/imagenet.py'
  assert cli.resolve_config_path('no_such_config') == 'no_such_config'
  assert {'default', 'fashion_mnist', 'imagenet', 'imagenet256', 'cifar10'} <= set(
      cli.config_names())


def test_metric_names_in_evaluates_help_are_registered_metrics():
  # --help names them without loading the registry (scipy); without --metrics, evaluate takes
  # every metric of the registry itself.
  fv = flags.FlagValues()
  evaluate.define_flags(fv)
  listed = fv['metrics'].help.split(':', 1)[1].split(' or another')[0].strip().split(', ')
  assert set(listed) == set(registry.metric_names()), listed


def test_config_check_accepts_every_shipped_config():
  for module in (cifar10, default, fashion_mnist, imagenet, imagenet256):
    config_check.check_config(module.get_config())
  config_check.check_config(imagenet.get_config('32'))
