"""Preemption: SIGTERM mid-run saves one step everywhere, and resuming loses nothing.

train.py subprocesses on the tiny config with a constant learning rate, so
a run's length does not change its steps: the run to preempt is set to
train "forever", gets SIGTERM once it has logged a few steps, must exit
with status 143 after saving exactly the step it reached; the same command
with the reference's length then resumes from it, and every step's loss
must equal an uninterrupted reference run's.

  * one process: train.py's own SIGTERM handler;
  * two processes on localhost (1 CPU device each, gloo collectives), joined
    by the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    variables alone (the automatic start-up), SIGTERM to process 1 only:
    JAX's preemption notifier tells process 0, and orbax's
    `reached_preemption` makes both save the same step.
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import portpicker
import pytest

from lintunet_jax.training import checkpointing
from lintunet_jax.training import metric_logs
from tests import train_testutil as tu

STEPS = 30  # the reference's length
FOREVER = 100_000


def _flags(data_dir, steps):
  return tu.tiny_flags(data_dir, schedule='constant', num_train_steps=steps,
                       checkpoint_every_steps=1000, eval_every_steps=1000,
                       model__attention__dropout=0.1, loss='bce_dice',
                       progress_bar=False)


def _logged_step(workdir) -> int:
  """The last step in DIR/metrics.jsonl (complete lines only), or 0."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [l for l in f.read().split('\n')[:-1] if l.strip()]
  steps = [json.loads(l)['step'] for l in lines if '"train"' in l]
  return max(steps, default=0)


def _sigterm_after(runs, target, workdir, after_step=3, timeout=240.0):
  """SIGTERMs `target` once `workdir` logged `after_step`; waits for all runs."""
  deadline = time.time() + timeout
  while _logged_step(workdir) < after_step:
    ended = [r for r in runs if r.proc.poll() is not None]
    if ended:
      pytest.fail(f'train.py ended ({ended[0].proc.returncode}) before the '
                  f'SIGTERM:\n{ended[0].wait().stderr[-4000:]}')
    if time.time() > deadline:
      pytest.fail('no training step logged in time')
    time.sleep(0.01)
  os.kill(target.proc.pid, signal.SIGTERM)
  return [r.wait(timeout=120) for r in runs]


def _check_preempted(results, workdir, num_processes):
  """Every process exited 143 naming the same step, the one checkpoint."""
  steps = []
  for result in results:
    assert result.returncode == 143, (result.returncode, result.stderr[-4000:])
    line = next(l for l in result.stderr.splitlines() if 'preempted' in l)
    steps.append(int(line.split('checkpoint of step ')[1].split()[0]))
  assert len(set(steps)) == 1, steps
  step = steps[0]
  assert 3 <= step < STEPS - 2, step  # mid-run, and the resume has steps to do
  # The step reached, saved once and completely (no earlier save was due).
  assert checkpointing.list_checkpoints(workdir) == [step]
  data = os.path.join(checkpointing.checkpoint_dir(workdir), str(step), 'data_iterator')
  assert sorted(n for n in os.listdir(data) if n.endswith('.json')) == [
      f'process_{i}-of-{num_processes}.json' for i in range(num_processes)]
  return step


def _check_resumed_like(workdir, reference, step):
  records = metric_logs.read_metrics(str(workdir))
  assert [r['step'] for r in records if r['type'] == 'resume'] == [step]
  got, want = tu.train_losses(workdir), tu.train_losses(reference)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  assert len(set(want.values())) == STEPS  # the losses change step to step
  np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)],
                             [want[s] for s in range(1, STEPS + 1)],
                             rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_and_resumes_like_uninterrupted(
    tmp_path, tmp_path_factory):
  data_dir, cache = tu.data_dir(tmp_path_factory), tu.cache_dir(tmp_path_factory)
  reference = tu.Run(tmp_path / 'reference', _flags(data_dir, STEPS), cache=cache)
  workdir = tmp_path / 'run'
  run = tu.Run(workdir, _flags(data_dir, FOREVER), cache=cache)
  try:
    [result] = _sigterm_after([run], run, workdir)
    step = _check_preempted([result], workdir, 1)
    assert reference.wait().returncode == 0
  finally:
    reference.kill()
    run.kill()
  resumed = tu.run_train(workdir, _flags(data_dir, STEPS), cache=cache)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  _check_resumed_like(workdir, tmp_path / 'reference', step)


def _pair(workdir, flags, cache, name):
  """A 2-process run of train.py on localhost, started by environment only."""
  port = portpicker.pick_unused_port()
  return [tu.Run(workdir, flags, cache=cache, log_name=f'{name}-{i}', extra_env={
      'JAX_COORDINATOR_ADDRESS': f'localhost:{port}', 'JAX_NUM_PROCESSES': 2,
      'JAX_PROCESS_ID': i}) for i in range(2)]


def _wait_all(runs, timeout=300):
  try:
    results = [r.wait(timeout=timeout) for r in runs]
  finally:
    for r in runs:  # one run timed out: its partner would wait for it forever
      r.kill()
  for result in results:
    assert result.returncode == 0, result.stderr[-4000:]
  return results


@pytest.mark.slow
def test_two_processes_sigterm_to_one_both_save_the_same_step_and_resume(
    tmp_path, tmp_path_factory):
  cache = tu.cache_dir(tmp_path_factory)
  reference = _pair(tmp_path / 'reference', _flags(tu.data_dir(tmp_path_factory), STEPS),
                    cache, 'reference')
  # A data_dir of its own: process 0 prepares it, process 1 waits and reuses it.
  data_dir = str(tmp_path / 'tfds')
  workdir = tmp_path / 'run'
  runs = _pair(workdir, _flags(data_dir, FOREVER), cache, 'run')
  try:
    results = _sigterm_after(runs, runs[1], workdir)
    step = _check_preempted(results, workdir, 2)
    _wait_all(reference)
  finally:
    for r in reference + runs:
      r.kill()
  assert 'synthetic_mri: prepared' in results[0].stdout, results[0].stdout[-2000:]
  assert 'synthetic_mri: reusing' in results[1].stdout, results[1].stdout[-2000:]
  assert 'synthetic_mri: prepared' not in results[1].stdout
  resumed = _wait_all(_pair(workdir, _flags(data_dir, STEPS), cache, 'resumed'))
  _check_resumed_like(workdir, tmp_path / 'reference', step)
  for result in resumed:
    assert 'in 2 process(es)' in result.stderr
