"""What eval.py and predict.py write for tests/fixtures/tiny_workdir,
recorded before the evaluation code was redesigned (one restore, one
settings object, one prediction stream), so that the redesign can be held
to "the same outputs" (tests/evaluation/test_eval_outputs.py).

    python -m tests.evaluation.eval_outputs   # rewrites tests/fixtures/eval_outputs.json

Only rerun it for a change meant to alter these outputs, and say why in the
commit. Timestamps, timings and temporary paths are left out.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

FIXTURE = ROOT / 'tests' / 'fixtures' / 'eval_outputs.json'
WORKDIR = ROOT / 'tests' / 'fixtures' / 'tiny_workdir'
# eval.py runs: name -> extra flags (on top of --workdir, the data_dir and
# --nothroughput --noprogress).
EVAL_RUNS = {
    'native': [],
    'model_canvas': ['--resolution=model', '--split=validation'],
    'window_flips_ensemble': ['--sliding_window', '--tta=flips', '--num_overlays=2',
                              '--workdir={second}'],
}
TIMING = ('created', 'eval_seconds', 'throughput', 'train_throughput', 'seconds')


def _clean(value: Any, tmp: str) -> Any:
  if isinstance(value, dict):
    return {k: _clean(v, tmp) for k, v in value.items() if k not in TIMING}
  if isinstance(value, list):
    return [_clean(v, tmp) for v in value]
  if isinstance(value, str):
    return value.replace(tmp, '<TMP>')
  if isinstance(value, float):
    return round(value, 6)
  return value


def _mask_digest(path: pathlib.Path) -> str:
  with Image.open(path) as image:
    return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()[:16]


def record(tmp: str) -> dict[str, Any]:
  from tests import train_testutil as tu  # pylint: disable=g-import-not-at-top
  from lintunet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(tmp)
  data_dir = str(root / 'data')
  pipeline.prepare_dataset(tu.tiny_config(data_dir))
  first, second = root / 'first', root / 'second'
  shutil.copytree(WORKDIR, first)
  shutil.copytree(WORKDIR, second)
  env = tu.env(1)
  outputs: dict[str, Any] = {}
  for name, extra in EVAL_RUNS.items():
    report = root / f'{name}.json'
    flags = [f'--workdir={first}', f'--config.dataset.data_dir={data_dir}',
             '--nothroughput', '--noprogress', f'--report={report}',
             *(flag.format(second=second) for flag in extra)]
    result = subprocess.run([sys.executable, str(ROOT / 'eval.py'), *flags], env=env,
                            cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    if result.returncode:
      raise RuntimeError(f'eval.py {name} failed:\n{result.stderr[-4000:]}')
    outputs[f'eval/{name}/report'] = _clean(json.loads(report.read_text()), tmp)
    cases = report.with_suffix('.cases.json')
    if cases.exists():
      outputs[f'eval/{name}/cases'] = _clean(json.loads(cases.read_text()), tmp)
  inputs = root / 'inputs'
  inputs.mkdir()
  rng = np.random.default_rng(0)
  for i, (height, width) in enumerate([(32, 32), (45, 27), (64, 80)]):
    Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).save(
        inputs / f'scan_{i}.png')
  for name, extra in {'plain': [], 'window_flips': ['--sliding_window', '--tta=flips']}.items():
    out = root / f'masks_{name}'
    result = subprocess.run(
        [sys.executable, str(ROOT / 'predict.py'), f'--workdir={first}',
         f'--input={inputs}', f'--output={out}', '--save-logits', *extra],
        env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    if result.returncode:
      raise RuntimeError(f'predict.py {name} failed:\n{result.stderr[-4000:]}')
    outputs[f'predict/{name}'] = {
        p.name: (_mask_digest(p) if p.suffix == '.png'
                 else hashlib.sha256(np.load(p).round(4).tobytes()).hexdigest()[:16])
        for p in sorted(out.rglob('*')) if p.is_file() and p.suffix in ('.png', '.npy')}
  return outputs


def main() -> None:
  with tempfile.TemporaryDirectory() as tmp:
    outputs = record(tmp)
  FIXTURE.write_text(json.dumps(outputs, indent=1, sort_keys=True) + '\n')
  print(f'{FIXTURE}: {len(outputs)} entries, {FIXTURE.stat().st_size / 1024:.0f} KiB')


if __name__ == '__main__':
  main()
