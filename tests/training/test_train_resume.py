"""kill -9 in the middle of a checkpoint save, re-run, same run continues.

Three train.py subprocesses on the same tiny config (dropout on, augmented
data, so RNG and input-pipeline state both matter): an uninterrupted
reference; a run killed with SIGKILL while orbax is writing a checkpoint
(its temporary directory exists); and the same command re-run on the killed
run's workdir. The resumed run must continue from the last complete
checkpoint and log, step for step, the losses of the reference.
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

from lintunet_jax.training import checkpointing
from lintunet_jax.training import metric_logs as logging_utils
from tests import train_testutil as tu

STEPS = tu.RESUME['num_train_steps']


def _flags(data_dir):
  return tu.tiny_flags(data_dir, **tu.RESUME, checkpoint_every_steps=1,
                       eval_every_steps=5, keep_checkpoints=2)


def _tmp_dirs(workdir):
  root = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(root):
    return []
  return [n for n in os.listdir(root) if 'orbax-checkpoint-tmp' in n]


def _kill_during_a_save(run: tu.Run, timeout=240.0):
  """SIGKILLs a train.py run while a checkpoint is being written."""
  deadline = time.time() + timeout
  try:
    while time.time() < deadline:
      if run.proc.poll() is not None:
        pytest.fail(f'train.py ended ({run.proc.returncode}) before it could be '
                    f'killed mid-save:\n{run.wait().stderr[-3000:]}')
      if len(checkpointing.list_checkpoints(run.workdir)) >= 2 and _tmp_dirs(run.workdir):
        os.kill(run.proc.pid, signal.SIGKILL)
        assert run.wait(30).returncode == -signal.SIGKILL
        return
      time.sleep(0.002)
    pytest.fail('no checkpoint save seen in time')
  finally:
    run.wait(timeout=1)


@pytest.mark.slow
def test_resume_after_kill_9_mid_save_matches_uninterrupted(tmp_path, tmp_path_factory):
  data_dir, cache = tu.data_dir(tmp_path_factory), tu.cache_dir(tmp_path_factory)
  flags = _flags(data_dir)
  # The reference and the run to kill start together (tu.Run).
  reference_run = tu.Run(tmp_path / 'reference', flags, cache=cache)
  workdir = str(tmp_path / 'run')
  try:
    _kill_during_a_save(tu.Run(workdir, flags, cache=cache))
    assert _tmp_dirs(workdir), 'the kill did not land during a save'
    reference = reference_run.wait()
  finally:
    reference_run.kill()
  assert reference.returncode == 0, reference.stderr[-5000:]
  want = tu.train_losses(tmp_path / 'reference')
  assert sorted(want) == list(range(1, STEPS + 1))
  completed = checkpointing.list_checkpoints(workdir)
  assert completed and max(completed) < STEPS
  resumed = tu.run_train(workdir, flags, cache=cache)
  assert resumed.returncode == 0, resumed.stderr[-5000:]

  # Resumed from the last complete checkpoint, the half-written one removed.
  records = logging_utils.read_metrics(workdir)
  resume = [r for r in records if r['type'] == 'resume']
  assert [r['step'] for r in resume] == [max(completed)]
  assert not _tmp_dirs(workdir)
  assert checkpointing.list_checkpoints(workdir) == checkpointing.list_checkpoints(
      tmp_path / 'reference')
  # The same run: every step's loss as in the uninterrupted reference (records
  # the killed run wrote past its checkpoint were replaced, not duplicated).
  got = tu.train_losses(workdir)
  steps = [r['step'] for r in records if r['type'] == 'train']
  assert steps == list(range(1, STEPS + 1))
  assert len(set(want.values())) == STEPS  # the losses do change step to step
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-6, atol=1e-7)
  evals = lambda d: [(r['step'], r['iou'], r['loss'])
                     for r in logging_utils.read_metrics(str(d), 'eval')]
  assert [e[0] for e in evals(workdir)] == [5, 10]
  np.testing.assert_allclose(np.array(evals(workdir)), np.array(evals(tmp_path / 'reference')),
                             rtol=1e-6, atol=1e-7)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['num_train_steps'] == STEPS
