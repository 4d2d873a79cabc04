"""Multi-process start-up: launcher detection, the checks, barriers (distributed.py).

Launcher detection and the process-count check are pure functions of the
environment, tested on the variables each launcher sets. The shared-workdir
check and `main_process_first` run for real in two processes on localhost
(jax.distributed over a local coordinator, gloo CPU collectives).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import ml_collections
import portpicker
import pytest

from lintunet_jax.training import distributed, parallel
from tests import train_testutil as tu

SLURM_2 = {'SLURM_JOB_ID': '77', 'SLURM_STEP_NODELIST': 'node[1-2]', 'SLURM_NTASKS': '2',
           'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}


@pytest.mark.parametrize('environ, name, count', [
    ({}, None, None),
    ({'JAX_COORDINATOR_ADDRESS': 'h0:1234', 'JAX_NUM_PROCESSES': '4'},
     'JAX_COORDINATOR_ADDRESS', 4),
    ({'JAX_COORDINATOR_ADDRESS': 'h0:1234'}, 'JAX_COORDINATOR_ADDRESS', None),
    (SLURM_2, 'SLURM', 2),
    # An sbatch script's own shell (no srun step): one process, not a cluster.
    ({'SLURM_JOB_ID': '77', 'SLURM_NTASKS': '2'}, None, None),
    ({'OMPI_COMM_WORLD_SIZE': '8', 'OMPI_COMM_WORLD_RANK': '3'}, 'Open MPI', 8),
    ({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}, 'TPU workers', 4),
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, 'TPU workers', 1),
])
def test_detect_launcher(environ, name, count):
  launcher = distributed.detect_launcher(environ, on_cloud_tpu_vm=False)
  assert (launcher and launcher.name) == name
  assert (launcher and launcher.num_processes) == count


def test_a_cloud_tpu_vm_is_left_to_jax():
  launcher = distributed.detect_launcher({}, on_cloud_tpu_vm=True)
  assert launcher.name == 'Cloud TPU VM' and launcher.num_processes is None
  assert distributed._wants_initialize(None, launcher)


@pytest.mark.parametrize('setting, environ, wanted', [
    (None, {}, False), (None, SLURM_2, True), (None, {'OMPI_COMM_WORLD_SIZE': '1'}, False),
    (False, SLURM_2, False), (True, {}, True)])
def test_initialize_only_when_asked_or_launched_several(setting, environ, wanted):
  launcher = distributed.detect_launcher(environ, on_cloud_tpu_vm=False)
  assert distributed._wants_initialize(setting, launcher) == wanted


def test_several_launched_but_one_joined_is_an_error():
  launcher = distributed.detect_launcher(SLURM_2, on_cloud_tpu_vm=False)
  distributed.check_process_count(launcher, None, process_count=2)  # fine
  with pytest.raises(distributed.DistributedSetupError,
                     match=r'SLURM started 2 processes \(SLURM_NTASKS=2\) but JAX runs 1: '
                           r'config.distributed=False'):
    distributed.check_process_count(launcher, False, process_count=1)


def test_train_py_refuses_to_train_alone_under_a_launcher(tmp_path, tmp_path_factory):
  proc = subprocess.run(
      [sys.executable, str(tu.ROOT / 'train.py'), f'--workdir={tmp_path / "w"}',
       *tu.tiny_flags(str(tmp_path / 'unused')), '--config.distributed=False'],
      env=tu.env(**SLURM_2), cwd=str(tu.ROOT), capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'error: SLURM started 2 processes (SLURM_NTASKS=2) but JAX runs 1' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_require_accelerator_fails_at_once_on_cpu():
  config = ml_collections.ConfigDict({'require_accelerator': True})
  with pytest.raises(parallel.NoAcceleratorError, match='requirements-gpu.txt'):
    parallel.check_accelerator(config)
  with pytest.raises(parallel.NoAcceleratorError):
    parallel.check_accelerator(None, required=True)
  info = parallel.check_accelerator(config, required=False)  # eval.py's choice wins
  assert info['platform'] == 'cpu' and info['process_count'] == 1
  assert 'in 1 process(es)' in parallel.format_platform(info)


CODE = textwrap.dedent('''
    import json, os, sys
    root = sys.argv[1]
    from lintunet_jax.training import distributed
    assert distributed.maybe_initialize_distributed(None)  # from the environment alone
    import jax
    index = jax.process_index()
    out = {'processes': jax.process_count()}

    # Shared: both see process 0's marker; it is removed afterwards.
    distributed.check_shared_workdir(os.path.join(root, 'shared'))
    out['left_behind'] = os.listdir(os.path.join(root, 'shared'))
    # Not shared: each process its own directory.
    try:
      distributed.check_shared_workdir(os.path.join(root, f'local-{index}'))
      out['local'] = 'passed'
    except distributed.DistributedSetupError as e:
      out['local'] = str(e)

    # Process 0 first: process 1 must find its file already there.
    def work():
      seen = sorted(os.listdir(os.path.join(root, 'shared')))
      open(os.path.join(root, 'shared', f'done-{index}'), 'w').close()
      return seen
    out['seen'] = distributed.main_process_first(work, 'do the work')

    def fail():
      if index == 0:
        raise ValueError('bad data')
      return 'ran'
    try:
      distributed.main_process_first(fail, 'prepare the dataset')
      out['failure'] = 'none'
    except Exception as e:
      out['failure'] = f'{type(e).__name__}: {e}'
    print(json.dumps(out))
''')


def test_shared_workdir_check_and_main_process_first_on_two_processes(tmp_path):
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(
      [sys.executable, '-c', CODE, str(tmp_path)],
      env=tu.env(JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES=2,
                 JAX_PROCESS_ID=i),
      cwd=str(tu.ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=180)
      assert p.returncode == 0, err[-4000:]
      results.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, got in enumerate(results):
    assert got['processes'] == 2
    if i == 0:  # the marker's writer removes it once both have looked
      assert got['left_behind'] == []
    assert 'is not shared' in got['local'] and 'process(es) [1]' in got['local'], got['local']
    assert got['failure'] == ('ValueError: bad data' if i == 0 else
                              'DistributedSetupError: process 0 failed to prepare '
                              'the dataset (see its log)')
  assert results[0]['seen'] == []
  assert results[1]['seen'] == ['done-0']
