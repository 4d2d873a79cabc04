"""gs:// everywhere a path is accepted, against a real GCS emulator.

The emulator (tests/gcs_testutil.py) is fake-gcs-server on 127.0.0.1; the
programs reach it through gcsfs, tensorstore and array_record's GCS reader,
as they would reach a real bucket. The end-to-end test trains with
`--workdir gs://...` and the dataset prepared on the bucket, kills the run
with SIGKILL after its first checkpoint, resumes it from the bucket,
compares every loss with an uninterrupted local run, then runs eval.py and
predict.py on the bucket. Every program runs in an empty working
directory, which must stay empty: a path mistaken for a local one would
create `./gs:/...` there.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from lintunet_jax import paths
from lintunet_jax.training import checkpointing
from lintunet_jax.training import metric_logs
from tests import train_testutil as tu
from tests.gcs_testutil import gcs  # noqa: F401  (the session fixture)

ROOT = tu.ROOT
STEPS = tu.RESUME['num_train_steps']


def _lines(data: bytes) -> list[dict]:
  return [json.loads(line) for line in data.decode().splitlines()]


# ---------------------------------------------------------------- unit tests


def test_metrics_jsonl_on_gcs_is_rewritten_whole_and_truncated_on_resume(gcs):
  bucket = 'metrics-unit'
  workdir = gcs.create_bucket(bucket) + '/run'
  writer = metric_logs.MetricWriter(workdir, start_step=0, flush_secs=3600)
  for step in (1, 2, 3):
    writer.write('train', step, {'loss': 1.0 / step})
  # Buffered until a flush: nothing is uploaded per record.
  assert 'run/metrics.jsonl' not in gcs.list_objects(bucket)
  writer.flush()
  assert [r['step'] for r in _lines(gcs.read_object(bucket, 'run/metrics.jsonl'))] == [1, 2, 3]
  writer.write('eval', 4, {'iou': 0.5})
  writer.close()
  records = _lines(gcs.read_object(bucket, 'run/metrics.jsonl'))
  assert [(r['type'], r['step']) for r in records] == [
      ('train', 1), ('train', 2), ('train', 3), ('eval', 4)]
  events = [n for n in gcs.list_objects(bucket, 'run/tensorboard/')]
  assert len(events) == 1 and 'events.out.tfevents' in events[0]
  assert b'train/loss' in gcs.read_object(bucket, events[0])

  # A run resuming from step 2: records past it are dropped at once (on the
  # bucket, before anything new is written), new ones follow.
  writer = metric_logs.MetricWriter(workdir, start_step=2, flush_secs=3600)
  assert [r['step'] for r in _lines(gcs.read_object(bucket, 'run/metrics.jsonl'))] == [1, 2]
  writer.write('resume', 2, {})
  writer.write('train', 3, {'loss': 0.25})
  writer.close()
  assert [(r['type'], r['step']) for r in metric_logs.read_metrics(workdir)] == [
      ('train', 1), ('train', 2), ('resume', 2), ('train', 3)]
  assert len(gcs.list_objects(bucket, 'run/tensorboard/')) == 2  # one per run


def test_only_committed_checkpoints_on_gcs_are_listed(gcs):
  # On gs:// orbax writes a checkpoint in place and marks it complete last;
  # one cut short by a kill (no marker) must never be listed or restored.
  workdir = gcs.create_bucket('list-unit') + '/run'
  paths.write_text(f'{workdir}/checkpoints/3/model/_METADATA', '{}')
  assert checkpointing.list_checkpoints(workdir) == []
  paths.write_text(f'{workdir}/checkpoints/3/commit_success.txt', '')
  assert checkpointing.list_checkpoints(workdir) == [3]


def test_local_metrics_stay_a_plain_appended_file(tmp_path):
  writer = metric_logs.MetricWriter(str(tmp_path), start_step=0, flush_secs=3600)
  writer.write('train', 1, {'loss': 0.5})
  # Appended line by line: on disk before any flush or close.
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(l)['step'] for l in lines] == [1]
  writer.close()
  assert (tmp_path / 'tensorboard').is_dir()


def test_unknown_scheme_and_missing_backend_are_clear_errors(monkeypatch):
  with pytest.raises(paths.UnsupportedPathError, match=r"ftp:// URLs are not supported"):
    paths.check('ftp://host/run', '--workdir')
  monkeypatch.setitem(sys.modules, 'gcsfs', None)  # as if not installed
  with pytest.raises(paths.UnsupportedPathError,
                     match=r"--workdir 'gs://b/run'.*pip install gcsfs"):
    paths.check('gs://b/run', '--workdir')
  # Local paths pass unchanged (with ~ expanded); URLs stay URLs.
  assert str(paths.check('~/x')) == os.path.expanduser('~/x')
  assert paths.absolute('gs://b/run') == 'gs://b/run'


def _block_module(name: str, script: pathlib.Path, args: list[str]) -> list[str]:
  """A command running `script` with `name` unimportable (not installed)."""
  code = (f'import runpy, sys; sys.modules[{name!r}] = None; '
          f'sys.argv = {[str(script)] + args!r}; '
          f'runpy.run_path({str(script)!r}, run_name="__main__")')
  return [sys.executable, '-c', code]


@pytest.mark.parametrize('program,args', [
    ('train.py', ['--workdir=gs://bkt/run', '--config', 'CONFIG']),
    ('eval.py', ['--workdir=gs://bkt/run']),
    ('predict.py', ['--workdir=/nowhere', '--input=x.png', '--output=gs://bkt/masks']),
])
def test_clis_refuse_gs_without_gcsfs_and_create_no_folder(tmp_path, program, args):
  args = [str(ROOT / 'configs' / 'lintunet.py') + ':quick' if a == 'CONFIG' else a
          for a in args]
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  proc = subprocess.run(_block_module('gcsfs', ROOT / program, args),
                        env=tu.env(), cwd=cwd, capture_output=True, text=True,
                        timeout=240)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'pip install gcsfs' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert list(cwd.iterdir()) == []


# ---------------------------------------------------------------- end to end


def _start(program: str, args: list[str], *, env: dict, cwd, log) -> subprocess.Popen:
  out = open(log, 'w+')
  return subprocess.Popen([sys.executable, str(ROOT / program), *args], env=env,
                          cwd=str(cwd), stdout=out, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, log, timeout: float = 300) -> tuple[int, str]:
  try:
    proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return proc.returncode, pathlib.Path(log).read_text()


def _committed_steps(gcs, bucket: str) -> list[int]:
  """Steps whose checkpoint orbax finalised on the bucket (commit marker)."""
  # run/checkpoints/<step>/commit_success.txt, written after all the items'
  # own run/checkpoints/<step>/<item>/commit_success.txt.
  parts = [n.split('/') for n in gcs.list_objects(bucket, 'run/checkpoints/')]
  return sorted(int(p[2]) for p in parts
                if len(p) == 4 and p[2].isdigit() and p[3] == 'commit_success.txt')


@pytest.mark.slow
def test_quick_recipe_trains_then_evaluates_on_gcs_with_the_defaults(gcs, tmp_path):
  """train.py, then eval.py with its defaults, as a user runs them on a bucket.

  The defaults are what the kill/resume test below does not take: the best
  checkpoint (every checkpoint's metrics read from the bucket), the test
  split, four overlays, the training curves read from the bucket's
  metrics.jsonl. Each program runs under a hard deadline: eval.py once
  waited forever here on a gs:// request (paths.GCS_REQUEST_TIMEOUT_S).
  """
  bucket = 'lintunet-defaults'
  workdir = f'{gcs.create_bucket(bucket)}/run'
  env = tu.env(1, None, **gcs.env())
  cwd = tmp_path / 'cwd'  # must stay empty
  cwd.mkdir()
  train = subprocess.run(
      [sys.executable, str(ROOT / 'train.py'),
       '--config', f'{ROOT / "configs" / "lintunet.py"}:quick', '--workdir', workdir,
       '--config.num_train_steps=20', '--config.progress_bar=False'],
      env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
  assert train.returncode == 0, train.stderr[-5000:]
  evaluation = subprocess.run(
      [sys.executable, str(ROOT / 'eval.py'), '--workdir', workdir,
       '--report', f'{workdir}/report.json', '--throughput=False', '--progress=False'],
      env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
  assert evaluation.returncode == 0, evaluation.stderr[-5000:]
  assert list(cwd.iterdir()) == []

  report = json.loads(gcs.read_object(bucket, 'run/report.json'))
  assert report['report_path'] == f'{workdir}/report.json'
  assert report['checkpoint'] == {'requested': 'best', 'step': 20}
  assert report['data']['split'] == 'test'
  assert 0.0 <= report['metrics']['iou'] <= 1.0
  pictures = sorted(n.rsplit('/', 1)[1] for n in gcs.list_objects(bucket, 'run/report/'))
  assert pictures == [f'overlay-test-{i:05d}.png' for i in range(4)] + ['training_curves.png']
  for name in pictures:
    with Image.open(io.BytesIO(gcs.read_object(bucket, f'run/report/{name}'))) as png:
      assert png.format == 'PNG' and png.size[0] > 100
  assert report['artifacts']['training_curves'] == f'{workdir}/report/training_curves.png'
  cases = json.loads(gcs.read_object(bucket, 'run/report.cases.json'))
  assert cases['metric_per_case']


@pytest.mark.slow
def test_train_kill_resume_eval_predict_on_gcs(gcs, tmp_path, tmp_path_factory):
  started = time.time()
  bucket = 'lintunet-e2e'
  root = gcs.create_bucket(bucket)
  workdir, data_dir = f'{root}/run', f'{root}/tfds'
  cache = tu.cache_dir(tmp_path_factory)
  env = tu.env(1, cache, **gcs.env())
  cwd = tmp_path / 'cwd'  # must stay empty
  cwd.mkdir()
  options = dict(tu.RESUME, checkpoint_every_steps=1, eval_every_steps=5,
                 keep_checkpoints=2)

  # (1) The gs:// run (data prepared on the bucket) and an uninterrupted
  # local reference start together; (2) the gs:// run is killed with
  # SIGKILL once a checkpoint is complete on the bucket.
  reference = tu.Run(tmp_path / 'reference', tu.tiny_flags(tu.data_dir(tmp_path_factory),
                                                           **options), cache=cache)
  flags = [f'--workdir={workdir}', *tu.tiny_flags(data_dir, **options)]
  run = _start('train.py', flags, env=env, cwd=cwd, log=tmp_path / 'killed.log')
  deadline = time.time() + 240
  while not _committed_steps(gcs, bucket):
    if run.poll() is not None or time.time() > deadline:
      pytest.fail(f'no checkpoint on the bucket before the run ended:\n'
                  f'{_finish(run, tmp_path / "killed.log")[1][-4000:]}')
    time.sleep(0.05)
  os.kill(run.pid, signal.SIGKILL)
  code, log = _finish(run, tmp_path / 'killed.log')
  assert code == -signal.SIGKILL, log[-3000:]
  killed_at = _committed_steps(gcs, bucket)
  assert killed_at and max(killed_at) < STEPS, 'the run finished before the kill'
  assert gcs.list_objects(bucket, 'tfds/synthetic_mri/small/')  # data on the bucket

  # Resume from the bucket: the same command.
  resumed = _start('train.py', flags, env=env, cwd=cwd, log=tmp_path / 'resumed.log')
  code, log = _finish(resumed, tmp_path / 'resumed.log')
  assert code == 0, log[-5000:]
  ref = reference.wait()
  assert ref.returncode == 0, ref.stderr[-5000:]

  # (3) One run, step for step the losses of the uninterrupted local run.
  records = _lines(gcs.read_object(bucket, 'run/metrics.jsonl'))
  resume_steps = [r['step'] for r in records if r['type'] == 'resume']
  assert len(resume_steps) == 1 and max(killed_at) <= resume_steps[0] < STEPS
  train = {r['step']: r['loss'] for r in records if r['type'] == 'train'}
  assert [r['step'] for r in records if r['type'] == 'train'] == list(range(1, STEPS + 1))
  want = tu.train_losses(tmp_path / 'reference')
  assert len(set(want.values())) == STEPS
  np.testing.assert_allclose([train[s] for s in sorted(want)],
                             [want[s] for s in sorted(want)], rtol=1e-6, atol=1e-7)
  assert json.loads(gcs.read_object(bucket, 'run/config.json'))['num_train_steps'] == STEPS
  events = gcs.list_objects(bucket, 'run/tensorboard/')
  assert len(events) == 2 and all(b'train/loss' in gcs.read_object(bucket, e)
                                  for e in events)
  assert _committed_steps(gcs, bucket)[-1] == STEPS

  # (4) eval.py writes its report and pictures to the bucket; (5) predict.py
  # reads the checkpoint from the bucket, one input from the bucket and one
  # local, and writes masks to gs://. The two run together.
  image = (np.random.default_rng(0).random((40, 48)) * 255).astype(np.uint8)
  local_input = tmp_path / 'scan_local.png'
  Image.fromarray(image).save(local_input)
  paths.write_bytes(f'{root}/inputs/scan_remote.png', local_input.read_bytes())
  evaluation = _start('eval.py', [
      f'--workdir={workdir}', '--checkpoint=latest', '--split=validation',
      '--nothroughput', '--num_overlays=1', '--noprogress'],
      env=env, cwd=cwd, log=tmp_path / 'eval.log')
  prediction = _start('predict.py', [
      f'--workdir={workdir}', '--checkpoint=latest', f'--input={local_input}',
      f'--input={root}/inputs/scan_remote.png', f'--output={root}/masks'],
      env=env, cwd=cwd, log=tmp_path / 'predict.log')
  code, log = _finish(evaluation, tmp_path / 'eval.log')
  assert code == 0, log[-5000:]
  report = json.loads(gcs.read_object(bucket, f'run/eval/validation-{STEPS}.json'))
  assert report['workdir'] == workdir
  assert report['report_path'] == f'{workdir}/eval/validation-{STEPS}.json'
  assert report['data']['num_images'] == 64  # synthetic_mri/small's validation
  assert 0.0 <= report['metrics']['iou'] <= 1.0
  pictures = gcs.list_objects(bucket, f'run/eval/validation-{STEPS}/')
  assert sorted(p.rsplit('/', 1)[1] for p in pictures) == [
      'overlay-validation-00000.png', 'training_curves.png']
  for name in pictures:
    assert Image.open(io.BytesIO(gcs.read_object(bucket, name))).format == 'PNG'

  code, log = _finish(prediction, tmp_path / 'predict.log')
  assert code == 0, log[-5000:]
  summary = json.loads(gcs.read_object(bucket, 'masks/predictions.json'))
  assert summary['workdir'] == workdir and summary['step'] == STEPS
  assert [e['mask'] for e in summary['written']] == [
      f'{root}/masks/scan_local.png', f'{root}/masks/scan_remote.png']
  for entry in summary['written']:
    mask = np.asarray(Image.open(io.BytesIO(
        gcs.read_object(bucket, entry['mask'][len(root) + 1:]))))
    assert mask.shape == image.shape and set(np.unique(mask)) <= {0, 255}
    assert np.mean(mask > 0) == pytest.approx(entry['foreground_fraction'])

  # Nothing was ever written to the programs' working directory.
  assert list(cwd.iterdir()) == []
  print(f'\nend-to-end on the GCS emulator: {time.time() - started:.0f} s')
