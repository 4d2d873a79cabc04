"""eval.py's per-volume numbers against nnU-Net v2's own evaluation.

  python benchmarks/nnunet_agreement.py --labels RAW/labelsTs \
      --predicted RUN/predicted --cases RUN/eval/test.cases.json \
      --out benchmarks/results/volumes_quick_cpu/nnunet_summary.json

Runs nnU-Net's `compute_metrics_on_folder` (its SimpleITK reader) on the
label volumes predict.py wrote, against the reference labels, writes
nnU-Net's summary.json to --out, and checks that every case's voxel
counts equal those eval.py reported in its per-case file (`--cases`) and
that Dice agrees to 1e-6. Exits 1 on a disagreement. Needs nnunetv2
(requirements-torch.txt). --cases and --out may be gs:// (where eval.py
wrote its report); --labels and --predicted must be local folders, since
nnU-Net's reader opens local files. A script, not stdin: nnU-Net's pool
starts processes by spawning, which re-imports the main module.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from lintunet_jax import paths  # noqa: E402


def _compare(ours: dict, theirs: dict, labels: list[int]) -> tuple[float, list[str]]:
  """(largest Dice difference, the disagreements found)."""
  problems, worst = [], 0.0
  by_file = {c['prediction_file'].rsplit('/', 1)[-1]: c for c in theirs['metric_per_case']}
  for mine in ours['metric_per_case']:
    nnunet = by_file.get(f'{mine["case"]}.nii.gz')
    if nnunet is None:
      problems.append(f'{mine["case"]}: no predicted file scored by nnU-Net')
      continue
    for c in labels:
      got, expected = mine['metrics'][str(c)], nnunet['metrics'][c]
      for key in ('TP', 'FP', 'FN', 'TN'):
        if got[key] != expected[key]:
          problems.append(f'{mine["case"]} class {c} {key}: {got[key]} vs {expected[key]}')
      if got['Dice'] is None or math.isnan(expected['Dice']):
        if not (got['Dice'] is None and math.isnan(expected['Dice'])):
          problems.append(f'{mine["case"]} class {c} Dice: {got["Dice"]} vs {expected["Dice"]}')
        continue
      worst = max(worst, abs(got['Dice'] - expected['Dice']))
  if worst > 1e-6:
    problems.append(f'Dice differs by up to {worst:.2e}')
  return worst, problems


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--labels', required=True, help='reference label volumes (labelsTs)')
  parser.add_argument('--predicted', required=True, help="predict.py's --output folder")
  parser.add_argument('--cases', required=True, help="eval.py's <report>.cases.json")
  parser.add_argument('--out', required=True, help="where to write nnU-Net's summary.json")
  args = parser.parse_args(argv)
  for flag in ('labels', 'predicted'):
    folder = getattr(args, flag)
    if paths.is_url(folder):
      parser.error(f'--{flag} {folder!r}: nnU-Net reads local files only; copy the '
                   'folder to a local disk first (gcloud storage cp -r)')
    if not pathlib.Path(folder).is_dir():
      parser.error(f'--{flag} {folder!r} does not exist or is not a folder')
  ours = json.loads(paths.check(args.cases, '--cases').read_text())
  # pylint: disable=g-import-not-at-top
  from nnunetv2.evaluation import evaluate_predictions as nnunet
  from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
  labels = sorted(int(c) for c in ours['metric_per_case'][0]['metrics'])
  theirs = nnunet.compute_metrics_on_folder(args.labels, args.predicted, None, SimpleITKIO(),
                                            '.nii.gz', labels, num_processes=1)
  with tempfile.TemporaryDirectory() as tmp:  # nnU-Net's own summary.json layout
    local = pathlib.Path(tmp) / 'summary.json'
    nnunet.save_summary_json(theirs, str(local))
    paths.write_text(args.out, local.read_text())
  worst, problems = _compare(ours, theirs, labels)
  print(f'nnU-Net v2 on the written volumes: foreground Dice '
        f'{theirs["foreground_mean"]["Dice"]:.4f} (eval.py: '
        f'{ours["foreground_mean"]["Dice"]:.4f}); {len(ours["metric_per_case"])} volumes, '
        f'largest per-case Dice difference {worst:.1e}')
  for problem in problems:
    print('DISAGREES:', problem, file=sys.stderr)
  return 1 if problems else 0


if __name__ == '__main__':
  sys.exit(main())
