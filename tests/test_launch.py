"""The launch scripts: their --dry-run commands, bad input, and real runs against fake tools.

Fake `gcloud`, `srun`, `scontrol`, `curl` and trainer programs record what they are given, so the
real code paths run here without a cloud or a cluster; the remote TPU worker commands run in a
temporary home folder as they would on a worker.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(REPO, 'launch', 'tpu_vm.sh')
GPU = os.path.join(REPO, 'launch', 'gpu_multinode.sh')
SLURM = os.path.join(REPO, 'launch', 'slurm.sbatch')
SETUP_VENV = os.path.join(REPO, 'launch', 'setup_venv.sh')
PREPARE_TFDS = os.path.join(REPO, 'launch', 'prepare_tfds.sh')
ZONE = '--zone=us-central2-b'
SLURM_ENV = {'SLURM_JOB_ID': '77', 'SLURM_JOB_NUM_NODES': '2', 'SLURM_NTASKS': '2',
             'SLURM_GPUS_ON_NODE': '8', 'SLURM_SUBMIT_DIR': REPO}
# gcloud's record of one call: its arguments as JSON, one call per line; describe prints a state.
FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, sys
with open(os.environ['GCLOUD_LOG'], 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\\n')
if 'describe' in sys.argv:
  state = os.environ.get('FAKE_STATE', 'READY')
  sys.exit(1) if state == 'MISSING' else print(state)
"""


def run_script(script, *args, env=None, path=None, check=True):
  """Runs a launch script with bash; returns the CompletedProcess."""
  full_env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'DRY_RUN'))}
  full_env.update(env or {})
  if path is not None:
    full_env['PATH'] = path
  result = subprocess.run(['/bin/bash', script, *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, check=False, timeout=60)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def dry_run(script, *args, env=None):
  """The commands a --dry-run prints, each split back into its words."""
  result = run_script(script, '--dry-run', *args, env=env)
  return [shlex.split(line) for line in result.stdout.splitlines()]


def remote_command(words):
  """The --command=... of a `gcloud compute tpus tpu-vm ssh` line."""
  [command] = [w[len('--command='):] for w in words if w.startswith('--command=')]
  return command


def write_executable(path, text):
  with open(path, 'w') as f:
    f.write(text)
  os.chmod(path, 0o755)


@pytest.fixture(name='fake_gcloud')
def fixture_fake_gcloud(tmp_path):
  """A PATH whose gcloud records its calls; returns (PATH, env, a reader of the calls)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  write_executable(bin_dir / 'gcloud', FAKE_GCLOUD)
  log = tmp_path / 'gcloud.log'
  env = {'GCLOUD_LOG': str(log), 'TMPDIR': str(tmp_path)}

  def calls():
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  return f'{bin_dir}:{os.environ["PATH"]}', env, calls


# --- shell checks --------------------------------------------------------------------------

def test_scripts_pass_shellcheck():
  if shutil.which('shellcheck') is None:
    pytest.skip('shellcheck is not installed: `make setup` installs it as root '
                '(apt-get install -y shellcheck)')
  scripts = sorted(os.path.relpath(p, REPO) for p in _launch_scripts())
  result = subprocess.run(['shellcheck', '-x', *scripts], cwd=REPO, capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def _launch_scripts():
  launch = os.path.join(REPO, 'launch')
  return [os.path.join(launch, name) for name in os.listdir(launch)
          if name.endswith(('.sh', '.sbatch'))]


def test_every_script_has_help_and_dry_run():
  for script in _launch_scripts():
    if script.endswith(('common.sh', 'get_fashion_mnist.sh')):
      continue
    usage = run_script(script, '--help').stdout
    assert '--dry-run' in usage and 'launch/' in usage, script
    assert os.access(script, os.X_OK), f'{script} is not executable (README runs it directly)'


# --- TPU VMs: the dry-run commands ---------------------------------------------------------

@pytest.mark.parametrize('accelerator,runtime', [
    ('v4-8', 'tpu-ubuntu2204-base'), ('v4-32', 'tpu-ubuntu2204-base'),
    ('v5litepod-16', 'v2-alpha-tpuv5-lite'), ('v5p-8', 'v2-alpha-tpuv5'),
    ('v6e-8', 'v2-alpha-tpuv6e'), ('v6e-256', 'v2-alpha-tpuv6e')])
def test_create_picks_the_runtime_version_of_the_type(accelerator, runtime):
  [create] = dry_run(TPU_VM, 'create', '--name=s1', ZONE, f'--accelerator-type={accelerator}')
  assert create == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 's1',
                    f'--accelerator-type={accelerator}', f'--version={runtime}', ZONE]


def test_create_spot_queued_resource_with_a_runtime_override():
  commands = dry_run(TPU_VM, 'create', '--name', 's1', '--zone', 'us-west4-a', '--project=p',
                     '--accelerator-type=v5litepod-16', '--runtime-version=v2-alpha-custom',
                     '--queued', '--spot')
  assert commands[0] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 's1',
                         '--node-id=s1', '--accelerator-type=v5litepod-16',
                         '--runtime-version=v2-alpha-custom', '--spot', '--zone=us-west4-a',
                         '--project=p']
  # Then it waits for the queued resource to be granted.
  assert commands[1][:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', 's1']
  assert len(commands) == 2


def test_setup_copies_the_checkout_to_every_worker(tmp_path):
  tar, scp, ssh = dry_run(TPU_VM, 'setup', '--name=s1', ZONE, env={'TMPDIR': str(tmp_path)})
  tarball = str(tmp_path / 'sagan_jax-s1.tar.gz')
  assert tar[:3] == ['tar', '-czf', tarball] and tar[-3:] == ['-C', REPO, '.']
  assert '--exclude=.venv' in tar and '--exclude=.git' in tar
  assert scp == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', tarball, 's1:sagan_jax.tar.gz',
                 '--worker=all', ZONE]
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 's1']
  assert '--worker=all' in ssh and ZONE in ssh
  assert remote_command(ssh) == ('mkdir -p sagan_jax && tar -xzf sagan_jax.tar.gz -C sagan_jax'
                                 ' && cd sagan_jax && bash launch/setup_venv.sh --accelerator=tpu')


def test_setup_fetches_a_git_ref():
  [ssh] = dry_run(TPU_VM, 'setup', '--name=s1', ZONE, '--repo', 'https://example.org/x y.git',
                  '--ref=v1.2', '--python=python3.12')
  assert '--worker=all' in ssh
  assert remote_command(ssh) == (
      "{ [ -d sagan_jax/.git ] || git clone -q 'https://example.org/x y.git' sagan_jax; }"
      ' && cd sagan_jax && git fetch -q origin v1.2 && git checkout -q --force FETCH_HEAD'
      ' && bash launch/setup_venv.sh --accelerator=tpu --python=python3.12')


def test_train_runs_main_on_all_workers_with_a_log_each():
  [ssh] = dry_run(TPU_VM, 'train', '--name=s1', ZONE, '--accelerator-type=v4-32',
                  '--workdir=gs://b/run 1', '--tfds-data-dir=gs://b/tfds',
                  '--config=configs/imagenet.py:32', '--', '--config.model.ch=96')
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 's1']
  assert '--worker=all' in ssh and ZONE in ssh
  command = remote_command(ssh)
  assert command.startswith('cd sagan_jax && ')
  assert 'export TFDS_DATA_DIR=gs://b/tfds;' in command
  assert ("nohup .venv/bin/python -m sagan_jax.main --config=configs/imagenet.py:32 "
          "'--workdir=gs://b/run 1' '--config.compilation_cache_dir=gs://b/run 1/xla_cache' "
          '--config.model.ch=96 >> "logs/train_worker$w.log" 2>&1 < /dev/null &') in command


def test_logs_stop_status_delete():
  [logs] = dry_run(TPU_VM, 'logs', '--name=s1', ZONE, '--worker=3')
  assert '--worker=3' in logs
  assert remote_command(logs) == 'cd sagan_jax && tail -n 100 -F logs/train_worker*.log'
  [stop] = dry_run(TPU_VM, 'stop', '--name=s1', ZONE)
  assert '--worker=all' in stop and 'kill -TERM $p' in remote_command(stop)
  describe, ssh = dry_run(TPU_VM, 'status', '--name=s1', ZONE)
  assert describe == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', 's1', ZONE]
  assert '--worker=all' in ssh
  assert dry_run(TPU_VM, 'delete', '--name=s1', ZONE) == [
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 's1', '--quiet', ZONE]]
  assert dry_run(TPU_VM, 'delete', '--name=s1', ZONE, '--queued') == [
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 's1', '--force', '--quiet',
       ZONE]]


def test_exec_runs_a_command_with_the_venv():
  [ssh] = dry_run(TPU_VM, 'exec', '--name=s1', ZONE, '--worker=0', '--', 'python', '-m',
                  'sagan_jax.sample', '--workdir=gs://b/run')
  assert '--worker=0' in ssh
  assert remote_command(ssh) == ('cd sagan_jax && . .venv/bin/activate && '
                                 'python -m sagan_jax.sample --workdir=gs://b/run')


def test_resume_dry_run_shows_the_preempted_case(tmp_path):
  commands = dry_run(TPU_VM, 'resume', '--name=s1', ZONE, '--accelerator-type=v4-16', '--spot',
                     '--workdir=gs://b/run', env={'TMPDIR': str(tmp_path)})
  verbs = [c[3:5] if c[0] == 'gcloud' else c[:1] for c in commands]
  assert verbs == [['tpu-vm', 'describe'], ['tpu-vm', 'delete'], ['tpu-vm', 'create'], ['tar'],
                   ['tpu-vm', 'scp'], ['tpu-vm', 'ssh'], ['tpu-vm', 'ssh']]
  assert '--spot' in commands[2]
  assert '-m sagan_jax.main' in remote_command(commands[-1])


# --- TPU VMs: real runs against a fake gcloud ----------------------------------------------

@pytest.mark.parametrize('state,expected', [
    ('PREEMPTED', ['describe', 'delete', 'create', 'scp', 'ssh', 'ssh']),
    ('MISSING', ['describe', 'create', 'scp', 'ssh', 'ssh']),
    ('READY', ['describe', 'scp', 'ssh', 'ssh'])])
def test_resume_runs_what_the_dry_run_prints(fake_gcloud, state, expected):
  path, env, calls = fake_gcloud
  args = ['resume', '--name=s1', ZONE, '--accelerator-type=v4-16', '--workdir=gs://b/run']
  run_script(TPU_VM, *args, env={**env, 'FAKE_STATE': state}, path=path)
  made = calls()
  assert [c[3] for c in made] == expected
  dry = [c[1:] for c in dry_run(TPU_VM, *args, env=env) if c[0] == 'gcloud']
  # describe asks for one field; every other call is exactly the dry run's.
  assert made[0] == dry[0]
  assert made[1:] == [c for c in dry[1:] if c[3] in expected[1:]]


def test_queued_resume_waits_for_the_new_resource(fake_gcloud):
  path, env, calls = fake_gcloud
  run_script(TPU_VM, 'resume', '--name=q1', ZONE, '--accelerator-type=v6e-8', '--queued',
             '--workdir=gs://b/run', env={**env, 'FAKE_STATE': 'ACTIVE'}, path=path)
  assert [c[2:4] for c in calls()] == [['queued-resources', 'describe'], ['tpu-vm', 'scp'],
                                       ['tpu-vm', 'ssh'], ['tpu-vm', 'ssh']]


def test_failed_queued_resource_stops_create(fake_gcloud):
  path, env, calls = fake_gcloud
  result = run_script(TPU_VM, 'create', '--name=q1', ZONE, '--accelerator-type=v5p-8', '--queued',
                      env={**env, 'FAKE_STATE': 'FAILED'}, path=path, check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith('error: q1 is FAILED')
  assert [c[2:4] for c in calls()] == [['queued-resources', 'create'],
                                       ['queued-resources', 'describe']]


def test_worker_commands_start_report_and_stop_training(tmp_path):
  """train, status and stop as a worker runs them: nohup, pid file, log, SIGTERM."""
  home = tmp_path / 'home'
  (home / 'sagan_jax' / '.venv' / 'bin').mkdir(parents=True)
  saved = tmp_path / 'saved'
  write_executable(home / 'sagan_jax' / '.venv' / 'bin' / 'python', f"""#!/bin/bash
trap 'echo saved > {saved}; exit 0' TERM
echo "args: $* TFDS_DATA_DIR=$TFDS_DATA_DIR"
while true; do sleep 0.05; done
""")
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  write_executable(bin_dir / 'curl', '#!/bin/bash\necho 3\n')  # The metadata server: worker 3.
  env = {'HOME': str(home), 'PATH': f'{bin_dir}:{os.environ["PATH"]}'}

  def on_worker(words):
    result = subprocess.run(['bash', '-c', remote_command(words)], cwd=home, env=env,
                            capture_output=True, text=True, check=False, timeout=10)
    assert result.returncode == 0, result.stderr
    return result.stdout

  [train] = dry_run(TPU_VM, 'train', '--name=s1', ZONE, '--accelerator-type=v4-8',
                    '--workdir=gs://b/run', '--tfds-data-dir=gs://b/tfds')
  _, status = dry_run(TPU_VM, 'status', '--name=s1', ZONE)
  [stop] = dry_run(TPU_VM, 'stop', '--name=s1', ZONE)
  pid_file = home / 'sagan_jax' / 'train.pid'
  try:
    assert on_worker(train).strip() == 'worker 3: training, log ~/sagan_jax/logs/train_worker3.log'
    assert on_worker(train).startswith('worker 3: already training (pid ')
    assert on_worker(status).startswith('worker 3: training (pid ')
    assert on_worker(stop).strip() == 'worker 3: stopped (checkpoint saved)'
    assert saved.read_text() == 'saved\n'
    assert on_worker(status).strip() == 'worker 3: not training'
    assert on_worker(stop).strip() == 'worker 3: not training'
    log = (home / 'sagan_jax' / 'logs' / 'train_worker3.log').read_text()
    assert log == ('args: -m sagan_jax.main --config=configs/imagenet.py --workdir=gs://b/run '
                   '--config.compilation_cache_dir=gs://b/run/xla_cache '
                   'TFDS_DATA_DIR=gs://b/tfds\n')
  finally:
    _kill_if_running(pid_file)


# --- bad input: one line, exit 2, nothing run ----------------------------------------------

@pytest.mark.parametrize('args,message', [
    (['create', '--accelerator-type=v4-8'], 'no zone given: pass --zone=ZONE'),
    (['create', ZONE], 'no accelerator type given'),
    (['create', ZONE, '--accelerator-type=v3-8'], "unknown accelerator type 'v3-8'"),
    (['create', ZONE, '--accelerator-type=v5e-16'], "unknown accelerator type 'v5e-16'"),
    (['create', ZONE, '--accelerator-type=v4-12'], "unknown accelerator type 'v4-12'"),
    (['create', ZONE, '--accelerator-type=v6e-12'], "unknown accelerator type 'v6e-12'"),
    (['train', ZONE, '--accelerator-type=v4-8'], 'no workdir given: pass --workdir=gs://'),
    (['resume', ZONE, '--accelerator-type=v4-16', '--workdir=/tmp/run'],
     'the 2 hosts of v4-16 must share it'),
    (['train', ZONE, '--accelerator-type=v5litepod-16', '--workdir=runs/x'],
     'the 4 hosts of v5litepod-16 must share it'),
    (['train', ZONE, '--accelerator-type=v5p-16', '--workdir=runs/x'], 'is not on gs://'),
    (['train', ZONE, '--accelerator-type=v6e-32', '--workdir=runs/x'], 'is not on gs://'),
    (['explode', ZONE], "unknown command 'explode'"),
    ([ZONE], 'no command given'),
    (['create', ZONE, '--accelerator-type=v4-8', '--name=Bad_Name'], 'not a valid TPU name'),
    (['logs', ZONE, '--worker=first'], 'is not a worker'),
    (['logs', ZONE, '--bogus=1'], 'unknown option --bogus'),
    (['logs', ZONE, '--zone'], '--zone needs a value'),
    (['exec', ZONE], 'exec needs a command after --'),
])
def test_tpu_vm_rejects_bad_input(fake_gcloud, args, message):
  path, env, calls = fake_gcloud
  for extra in (['--dry-run'], []):
    result = run_script(TPU_VM, *extra, *args, env=env, path=path, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ''
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith('error: ')
    assert message in result.stderr
  assert not calls()


def test_single_host_slices_may_use_a_local_workdir():
  for accelerator in ('v4-8', 'v5litepod-8', 'v5p-8', 'v6e-4'):
    dry_run(TPU_VM, 'train', ZONE, f'--accelerator-type={accelerator}', '--workdir=/tmp/run')


def test_missing_gcloud_is_one_line(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  result = run_script(TPU_VM, 'create', ZONE, '--accelerator-type=v4-8', path=str(empty),
                      check=False)
  assert result.returncode == 2 and result.stdout == ''
  assert result.stderr.startswith('error: gcloud not found: install the Google Cloud CLI')
  assert len(result.stderr.splitlines()) == 1
  # A dry run needs no gcloud.
  run_script(TPU_VM, 'create', ZONE, '--accelerator-type=v4-8', '--dry-run', path=str(empty))


# --- GPU hosts and SLURM -------------------------------------------------------------------

def test_gpu_single_host_and_multinode_commands():
  assert dry_run(GPU, '--workdir=runs/x') == [
      ['.venv/bin/python', '-m', 'sagan_jax.main', '--config=configs/imagenet.py',
       '--workdir=runs/x']]
  assert dry_run(GPU, '--coordinator', 'host0:1234', '--num-processes', '2', '--process-id', '1',
                 '--workdir=gs://b/r', '--gpus=0,1', '--tfds-data-dir=/data/tfds',
                 '--config=configs/cifar10.py', '--', '--config.train.batch_size=64') == [
      ['env', 'CUDA_VISIBLE_DEVICES=0,1', 'TFDS_DATA_DIR=/data/tfds', '.venv/bin/python', '-m',
       'sagan_jax.main', '--config=configs/cifar10.py', '--workdir=gs://b/r',
       '--coordinator_address=host0:1234', '--num_processes=2', '--process_id=1',
       '--config.train.batch_size=64']]


@pytest.mark.parametrize('args,message', [
    ([], 'no workdir given'),
    (['--workdir=x', '--coordinator=h:1'], 'needs all of --coordinator=HOST:PORT'),
    (['--workdir=x', '--coordinator=h', '--num-processes=2', '--process-id=0'],
     'is not HOST:PORT'),
    (['--workdir=x', '--coordinator=h:1', '--num-processes=0', '--process-id=0'],
     'not a positive number'),
    (['--workdir=x', '--coordinator=h:1', '--num-processes=2', '--process-id=2'],
     '--process-id=2 is not in 0..1'),
    (['--workdir=x', '--gpus=all'], 'not a list of GPU indices'),
    (['--workdir=x', '--venv=/nonexistent'], '/nonexistent/bin/python not found'),
])
def test_gpu_rejects_bad_input(args, message):
  extras = ([],) if '--venv=/nonexistent' in args else (['--dry-run'], [])
  for extra in extras:
    result = run_script(GPU, *extra, *args, check=False)
    assert result.returncode == 2 and result.stdout == ''
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr


def test_gpu_script_hands_over_to_the_trainer(tmp_path):
  """The trainer replaces the script (exec), so SIGTERM sent to it reaches the trainer."""
  venv = tmp_path / 'venv'
  (venv / 'bin').mkdir(parents=True)
  write_executable(venv / 'bin' / 'python', '#!/bin/bash\necho "$$ $*"\n')
  script = subprocess.Popen(['bash', GPU, '--workdir=w', f'--venv={venv}'], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  out, err = script.communicate(timeout=30)
  assert script.returncode == 0, err
  assert out == f'{script.pid} -m sagan_jax.main --config=configs/imagenet.py --workdir=w\n'


def test_slurm_one_process_per_node_sees_all_its_gpus():
  env = {**SLURM_ENV, 'SLURM_CPUS_PER_TASK': '32', 'DRY_RUN': '1'}
  result = run_script(SLURM, '--workdir=/shared/run', '--tfds-data-dir=/shared/tfds', '--',
                      '--config.train.num_steps=9', env=env)
  assert [shlex.split(line) for line in result.stdout.splitlines()] == [
      ['srun', '--kill-on-bad-exit=1', '--cpus-per-task=32', 'env',
       'JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7', 'TFDS_DATA_DIR=/shared/tfds', '.venv/bin/python',
       '-m', 'sagan_jax.main', '--config=configs/imagenet.py', '--workdir=/shared/run',
       '--config.train.num_steps=9']]
  assert not any(w.startswith('--coordinator') for w in result.stdout.split())


def test_slurm_one_process_per_gpu():
  [srun] = dry_run(SLURM, '--workdir=/shared/run', env={**SLURM_ENV, 'SLURM_NTASKS': '16'})
  assert srun == ['srun', '--kill-on-bad-exit=1', '--gpu-bind=none', '.venv/bin/python', '-m',
                  'sagan_jax.main', '--config=configs/imagenet.py', '--workdir=/shared/run']


@pytest.mark.parametrize('env,args,message', [
    ({}, [], 'no workdir given'),
    ({'SLURM_NTASKS': '6'}, ['--workdir=w'], '3 tasks per node with 8 GPUs'),
    ({'SLURM_NTASKS': '3'}, ['--workdir=w'], 'do not spread evenly'),
    ({}, ['--workdir=w', '--bogus=1'], 'unknown option --bogus'),
])
def test_slurm_rejects_bad_input(env, args, message):
  result = run_script(SLURM, '--dry-run', *args, env={**SLURM_ENV, **env}, check=False)
  assert result.returncode == 2 and result.stdout == ''
  assert len(result.stderr.splitlines()) == 1 and message in result.stderr


def test_slurm_outside_a_job(tmp_path):
  result = run_script(SLURM, '--workdir=w', check=False)
  assert result.returncode == 2 and 'not in a SLURM job' in result.stderr
  assert dry_run(SLURM, '--workdir=w')[0][:2] == ['srun', '--kill-on-bad-exit=1']


@pytest.fixture(name='fake_slurm')
def fixture_fake_slurm(tmp_path):
  """A fake srun (prints 'started', then runs until SIGTERM) and a scontrol that records."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  log = tmp_path / 'slurm.log'
  write_executable(bin_dir / 'srun', f"""#!/bin/bash
trap 'echo "srun got TERM" >> {log}; exit 0' TERM
echo $$ > {tmp_path}/srun.pid
echo "srun $*" >> {log}
echo started
[[ -n "${{SRUN_EXIT:-}}" ]] && exit "$SRUN_EXIT"
while true; do sleep 0.05; done
""")
  write_executable(bin_dir / 'scontrol', f'#!/bin/bash\necho "scontrol $*" >> {log}\n')
  (tmp_path / 'venv' / 'bin').mkdir(parents=True)
  write_executable(tmp_path / 'venv' / 'bin' / 'python', '#!/bin/bash\n')
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'DRY_RUN'))}
  env.update(SLURM_ENV, PATH=f'{bin_dir}:{os.environ["PATH"]}')
  yield env, log, str(tmp_path / 'venv')
  _kill_if_running(tmp_path / 'srun.pid')  # Left behind only when the script is broken.


def _kill_if_running(pid_file):
  """Kills a fake program this test started (checked by its path: pids are reused)."""
  try:
    pid = int(pid_file.read_text())
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      if str(pid_file.parent).encode() in f.read():
        os.kill(pid, signal.SIGKILL)
  except (OSError, ValueError):
    pass


def test_slurm_sigterm_saves_and_requeues(fake_slurm):
  env, log, venv = fake_slurm
  job = subprocess.Popen(['bash', SLURM, '--workdir=w', f'--venv={venv}'], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert job.stdout.readline() == 'started\n'
    job.send_signal(signal.SIGTERM)  # What --signal=B:TERM@120 sends before the time limit.
    assert job.wait(timeout=30) == 0
  finally:
    if job.poll() is None:
      job.kill()
    _kill_if_running(log.parent / 'srun.pid')
    job.communicate(timeout=30)
  lines = log.read_text().splitlines()
  assert lines[0].startswith('srun --kill-on-bad-exit=1 env JAX_LOCAL_DEVICE_IDS=')
  assert lines[1:] == ['srun got TERM', 'scontrol requeue 77']


def test_slurm_finished_training_is_not_requeued(fake_slurm):
  env, log, venv = fake_slurm
  for code in (0, 3):
    log.unlink(missing_ok=True)
    result = subprocess.run(['bash', SLURM, '--workdir=w', f'--venv={venv}'], cwd=REPO,
                            env={**env, 'SRUN_EXIT': str(code)}, capture_output=True, text=True,
                            check=False, timeout=30)
    assert result.returncode == code
    assert not any(line.startswith('scontrol') for line in log.read_text().splitlines())


# --- venv set-up and data preparation ------------------------------------------------------

def _pinned_jax():
  for line in open(os.path.join(REPO, 'requirements.txt')):
    match = re.match(r'jax(\[[a-z0-9,-]+\])?==([0-9][0-9a-z.]*)', line)
    if match:
      return match.group(2)
  raise AssertionError('requirements.txt pins no jax')


@pytest.mark.parametrize('accelerator', ['tpu', 'cuda12', 'cpu'])
def test_setup_venv_pins_the_accelerator_build_to_requirements(tmp_path, accelerator):
  venv = str(tmp_path / 'venv')
  commands = dry_run(SETUP_VENV, f'--accelerator={accelerator}', f'--venv={venv}',
                     f'--python={sys.executable}')
  pip = [venv + '/bin/python', '-m', 'pip', 'install', '-q']
  extra = [] if accelerator == 'cpu' else [f'jax[{accelerator}]=={_pinned_jax()}']
  assert commands == [[sys.executable, '-m', 'venv', venv], pip + ['--upgrade', 'pip'],
                      pip + ['-r', 'requirements.txt'] + extra, pip + ['--no-deps', '-e', '.'],
                      commands[-1]]
  assert commands[-1][:2] == [venv + '/bin/python', '-c']


@pytest.mark.parametrize('args,message', [
    ([], 'no accelerator given'), (['--accelerator=rocm'], "unknown accelerator 'rocm'"),
    (['--accelerator=tpu', 'extra'], "unexpected argument 'extra'")])
def test_setup_venv_rejects_bad_input(args, message):
  result = run_script(SETUP_VENV, '--dry-run', *args, check=False)
  assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
  assert message in result.stderr


def test_prepare_tfds_builds_then_copies_to_the_bucket(tmp_path):
  build, copy = dry_run(PREPARE_TFDS, '--dataset=imagenet2012', '--manual-dir=/data/in',
                        '--data-dir=/data/tfds', '--bucket-dir=gs://b/tensorflow_datasets/')
  assert build[:2] == ['.venv/bin/python', '-c'] and build[3:] == [
      'imagenet2012', '/data/tfds', '/data/in']
  assert 'download_and_prepare' in build[2]
  assert copy == ['gcloud', 'storage', 'cp', '--recursive', '/data/tfds/imagenet2012',
                  'gs://b/tensorflow_datasets/']
  for args, message in ((['--dataset=imagenet2012'], 'needs --manual-dir'),
                        (['--dataset=cifar10', '--bucket-dir=/x'], 'is not on gs://'),
                        (['--dataset=imagenet2012', f'--manual-dir={tmp_path}'],
                         'ILSVRC2012_img_train.tar not found')):
    result = run_script(PREPARE_TFDS, *args, check=False)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_get_fashion_mnist_dry_run(tmp_path):
  result = run_script(os.path.join(REPO, 'launch', 'get_fashion_mnist.sh'), '--dry-run',
                      env={'FASHION_MNIST_DIR': str(tmp_path)}, check=False)
  assert result.returncode == 1 and result.stdout == ''
  assert 'FASHION_MNIST_DIR=/that/folder' in result.stderr


# --- README: every launch command of the guides is accepted --------------------------------

def _readme_launch_commands():
  """`launch/...` commands of README's code blocks and inline code, as argument lists."""
  text = open(os.path.join(REPO, 'README.md')).read()
  lines = []
  for block in re.findall(r'```sh\n(.*?)```', text, re.S):
    lines += block.replace('\\\n', ' ').splitlines()
  outside = re.sub(r'```.*?```', '', text, flags=re.S)
  lines += [span.replace('\n', ' ') for span in re.findall(r'`([^`]+)`', outside)
            if span.startswith('launch/') and ' ' in span]
  commands = []
  for line in lines:
    words = shlex.split(line, comments=True)
    if any(w.startswith('launch/') for w in words):
      commands.append(words)
  return commands


def test_readme_launch_commands_pass_their_dry_runs():
  commands = _readme_launch_commands()
  scripts = {next(w for w in c if w.startswith('launch/')) for c in commands}
  assert scripts >= {'launch/tpu_vm.sh', 'launch/gpu_multinode.sh', 'launch/slurm.sbatch',
                     'launch/setup_venv.sh', 'launch/prepare_tfds.sh'}
  assert len(commands) >= 15
  for words in commands:
    at = next(i for i, w in enumerate(words) if w.startswith('launch/'))
    env = dict(w.split('=', 1) for w in words[:at] if re.match(r'[A-Z_]+=', w))
    if words[0] == 'sbatch':  # The allocation sbatch would make, as SLURM's variables.
      options = dict(w[2:].split('=', 1) for w in words[1:at] if '=' in w)
      nodes = int(options.get('nodes', 1))
      env.update(SLURM_ENV, SLURM_JOB_NUM_NODES=str(nodes),
                 SLURM_NTASKS=str(nodes * int(options.get('ntasks-per-node', 1))))
    result = run_script(os.path.join(REPO, words[at]), '--dry-run', *words[at + 1:], env=env,
                        check=False)
    assert result.returncode == 0, f'{shlex.join(words)}: {result.stderr}'
    assert result.stdout.strip(), shlex.join(words)
