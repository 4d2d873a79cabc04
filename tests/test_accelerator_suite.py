"""benchmarks/accelerator_suite.py: its CPU dry run end to end, so the suite
that only runs when a GPU is lent cannot rot between device sessions."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests import train_testutil

sys.path.insert(0, str(train_testutil.ROOT / 'benchmarks'))
import accelerator_suite  # noqa: E402  pylint: disable=wrong-import-position


@pytest.mark.parametrize('kind, tag', [
    ('NVIDIA H200', 'h200'), ('NVIDIA H100 80GB HBM3', 'h100'), ('TPU v5 lite', 'v5'),
    ('TPU v5e', 'v5e'), ('NVIDIA A100-SXM4-40GB', 'a100'), ('cpu', 'cpu')])
def test_result_files_are_named_after_the_device(kind, tag):
  assert accelerator_suite.device_tag(kind) == tag


def test_the_device_run_checks_every_kernel_case_and_attention_kind():
  # The dry run below checks a few (tests/attention checks every pattern).
  full = accelerator_suite.FULL
  assert [c[0] for c in accelerator_suite._kernel_cases(full)] == [  # pylint: disable=protected-access
      'linformer+local_2d', *accelerator_suite.attention_benchmark.PATTERNS]
  assert set(full.kernel_dtypes) == set(accelerator_suite.TOLERANCE)
  assert full.model_kinds == ('dense', 'linformer', 'block_sparse', 'linformer_block_sparse')


@pytest.mark.slow
def test_dry_run_measures_every_section_and_checks_the_kernels(tmp_path, tmp_path_factory):
  out = tmp_path / 'results'
  # One compilation cache for the run and the recount below: the recount
  # rebuilds the run's programs from their rows, and only a rebuild that is
  # the same program (the point of the check) finds them compiled.
  run_env = train_testutil.env(cache=train_testutil.cache_dir(tmp_path_factory))
  proc = subprocess.run(
      [sys.executable, str(train_testutil.ROOT / 'benchmarks' / 'accelerator_suite.py'),
       '--dry-run', f'--out={out}', '--budget-s=400'],
      env=run_env, cwd=str(train_testutil.ROOT), capture_output=True,
      text=True, timeout=400)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  files = {p.name: json.loads(p.read_text()) for p in out.glob('*.json')}
  assert sorted(files) == sorted(f'{s}_cpu_dryrun.json' for s in accelerator_suite.SECTIONS)
  for name, payload in files.items():
    assert 'error' not in payload, (name, payload.get('traceback'))
    assert payload['dry_run'] is True

  env = files['environment_cpu_dryrun.json']
  assert env['measured_peak_matmul']['bfloat16']['peak_flops_per_s'] > 0

  # Every kernel case ran against the dense reference, both kernels within
  # tolerance (a wrong softmax, mask or gradient fails here), nothing skipped.
  kernels = files['kernels_cpu_dryrun.json']
  assert kernels['pallas_correct'] and not kernels['mismatches']
  cases = {(r['dtype'], r['case']) for r in kernels['rows']}
  dry = accelerator_suite.DRY
  assert cases == {(d, c) for d in dry.kernel_dtypes for c in dry.kernel_cases}
  assert set(dry.kernel_dtypes) == set(accelerator_suite.TOLERANCE)
  for row in kernels['rows']:
    assert 'skipped' not in row
    for kernel in ('xla', 'pallas'):
      errors = row[f'{kernel}_rel_err']
      assert set(errors) >= {'out', 'dq', 'dk', 'dv'}
      assert max(errors.values()) <= accelerator_suite.TOLERANCE[row['dtype']]

  # Pallas kernels that passed section 2 are timed beside the XLA ones.
  attention = files['attention_cpu_dryrun.json']
  kinds = {r.get('kind') for r in attention['results'] if 'time_s' in r}
  assert {'dense', 'linformer', 'block_sparse', 'pallas_block_sparse'} <= kinds

  model = files['model_cpu_dryrun.json']
  timed = [r for r in model['results'] if 'images_per_s' in r]
  assert {(r['model'], r['mode']) for r in timed} >= {
      ('unet', 'forward'), ('lintunet', 'forward'), ('unet', 'train'), ('lintunet', 'train'),
      ('lintunet/dense', 'forward'), ('lintunet/block_sparse', 'forward')}
  assert all(0 < r['fraction_of_measured_peak'] for r in timed)

  training = files['training_cpu_dryrun.json']
  assert training['train_records'][-1]['step'] == training['steps']
  assert training['images_per_s_median'] > 0
  assert 0 <= training['input_wait_fraction_median'] <= 1
  assert training['first_step_s'] > 0
  assert np.isfinite(training['last_loss'])
  # The per-device recipe batch became the global batch (1 CPU device).
  assert training['global_batch_size'] == 4

  # --recount-flops rebuilds each timed program from its row alone: on the
  # CPU it must find the FLOPs the run itself counted (a wrong width,
  # attention kind, batch or mode in the rebuild changes them).
  before = {(r['group'], r['model'], r['mode']): r['flops_per_image'] for r in timed}
  before_attention = {(r['tokens'], r['mode'], r['kind'], r['pattern']): r['flops']
                      for r in attention['results'] if 'time_s' in r
                      and not r['kind'].startswith('pallas')}
  proc = subprocess.run(
      [sys.executable, str(train_testutil.ROOT / 'benchmarks' / 'accelerator_suite.py'),
       '--recount-flops', str(out / 'model_cpu_dryrun.json'),
       str(out / 'attention_cpu_dryrun.json')],
      env=run_env, cwd=str(train_testutil.ROOT), capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-5000:]
  model = json.loads((out / 'model_cpu_dryrun.json').read_text())
  after = {(r['group'], r['model'], r['mode']): r['flops_per_image']
           for r in model['results'] if 'images_per_s' in r}
  assert after.keys() == before.keys()
  for key, flops in before.items():
    assert after[key] == pytest.approx(flops, rel=1e-6), key
  attention = json.loads((out / 'attention_cpu_dryrun.json').read_text())
  for r in attention['results']:
    key = (r.get('tokens'), r.get('mode'), r.get('kind'), r.get('pattern'))
    if key in before_attention:
      assert r['flops'] == pytest.approx(before_attention[key], rel=1e-6), key
