"""The seed's comparison done properly: U-Net vs three LinTUNets, 3 seeds each.

  python benchmarks/seed_table.py --scale cpu          # 2-core CPU, reduced size
  python benchmarks/seed_table.py --scale full         # the seed's recipe, on a GPU/TPU
  python benchmarks/seed_table.py --scale cpu --seeds 0 --models unet,lintunet

The seed paper reported IoU 0.767 (LinTUNet) against 0.432 (U-Net) from
scores averaged over training batches. Here every model is trained on the
seed's data (`brain_tumor_coco` from `--data`, default
../shared/data/brain_tumor_seed, normalisation 'seed') with the seed's loss,
optimizer and step schedule; the checkpoint is chosen on the validation
split only (the best validation IoU: keep_best_checkpoints=1), and metrics
are counted once on the whole TEST split at each image's own size
(`evaluation.report.evaluate`, resolution 'native').

Models: `unet` (configs/unet.py), `lintunet_seed` (configs/lintunet.py:seed,
Linformer only), `lintunet` (configs/lintunet.py: Linformer + block-sparse)
and `block_sparse` (the default with model.attention.kind='block_sparse').

Scales (`SCALES`):
  full  the seed's recipe: 224x224, width 64, global batch 32, 40 epochs,
        bfloat16 compute (the :gpu recipe's dtype), Linformer seq_len 256
        and k 64 as the seed; for an accelerator.
  cpu   64x64 (a 4x4 token grid: seq_len 16, k 8; block-sparse tiles of 4
        tokens under local_2d(radius=1): 10 of the 16 tiles computed, 6
        empty), width 8, batch 16, 8 epochs (EPOCHS_CPU) with the seed's step
        schedule compressed (x0.1 every 2 epochs). Time, from one 1-epoch
        run of `lintunet` on the 2-core development machine while other
        jobs kept its load average at 4-5 (so an upper bound): ~26 s to
        compile the train step, ~10 s of set-up and checkpoints, ~21 s per
        training epoch plus ~9 s per validation pass, ~6 s for the test
        split; about 42 + 30 x 8 = 280 s a run, 12 runs ~56 min, less on
        an idle machine (and the seeds of a model share compilations
        through the persistent cache in <root>/jax_cache). Preparing the
        export once adds ~30 s.
  tiny  (tests only) 32x32, width 4, 2 steps.

Each run trains in <root>/<model>/seed<k> (`training.loop.train_and_evaluate`,
which resumes a killed run and returns at once when it has finished) and
writes <workdir>/test_metrics.json with the test metrics and every test
image's counts; a rerun reuses that file, so rerunning the command after a
kill skips every finished run. A run made with other settings is refused
(use another --root).

Aggregation over seeds: mean and sample standard deviation (ddof=1) of
dataset IoU (summed intersections / unions), per-image IoU (mean over
images), Dice, precision and recall. Per-image IoU of an image whose ground
truth and prediction are both empty is undefined (NaN, excluded by the mean:
the nnU-Net convention, as `metrics.iou_per_image`).

Differences against the U-Net are paired per image: each image's IoU is
averaged over the seeds of a model, the U-Net's is subtracted, and the mean
difference gets a percentile bootstrap 95 % interval over images
(BOOTSTRAP_RESAMPLES resamples, fixed generator seed). The interval
describes which images the test split happens to hold, with training seeds
averaged; the per-seed differences (seed k against U-Net seed k) are
reported beside it to show the seed-to-seed spread.

Outputs in --out (benchmarks/results): seed_table_<scale>.json (settings,
command, machine, per-run metrics, aggregates, differences),
seed_table_<scale>.md (the table the README cites), seed_table_<scale>.png
(bars with error bars) and seed_table_<scale>_disagreements.png (the test
images where the models' seed-averaged IoUs differ most, each model's
first-seed prediction as an error map).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shlex
import sys
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / 'benchmarks'):
  if str(_path) not in sys.path:
    sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402

DEFAULT_DATA = ROOT.parent / 'shared' / 'data' / 'brain_tumor_seed'
MODELS = ('unet', 'lintunet_seed', 'lintunet', 'block_sparse')
LABELS = {'unet': 'U-Net', 'lintunet_seed': 'LinTUNet (seed: Linformer)',
          'lintunet': 'LinTUNet (Linformer + block-sparse)',
          'block_sparse': 'LinTUNet (block-sparse only)'}
METRICS = ('iou', 'iou_per_image', 'dice', 'precision', 'recall')
METRIC_LABELS = {'iou': 'IoU (dataset)', 'iou_per_image': 'IoU (per image)',
                 'dice': 'Dice', 'precision': 'Precision', 'recall': 'Recall'}
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
NUM_DISAGREEMENTS = 4
EPOCHS_CPU = 8

# Config fields per scale (dotted names of configs/default.py).
SCALES = {
    'full': {
        'dataset.image_size': 224, 'model.width': 64, 'batch_size': 32,
        'eval_batch_size': 32, 'num_epochs': 40, 'model.dtype': 'bfloat16',
        'dataset.num_workers': -1,
    },
    'cpu': {
        'dataset.image_size': 64, 'model.width': 8, 'batch_size': 16,
        'eval_batch_size': 32, 'num_epochs': EPOCHS_CPU,
        'step_every_epochs': max(1, round(EPOCHS_CPU / 4)),
        'model.attention.seq_len': 16, 'model.attention.k': 8,
        'model.attention.block_size': 4,
        'model.attention.pattern': 'local_2d(radius=1)',
        'dataset.num_workers': 0,
    },
    'tiny': {
        'dataset.image_size': 32, 'model.width': 4, 'batch_size': 8,
        'eval_batch_size': 16, 'num_train_steps': 2,
        'model.attention.seq_len': 4, 'model.attention.k': 4,
        'model.attention.block_size': 2,
        'model.attention.pattern': 'local_2d(radius=1)',
        'dataset.num_workers': 0, 'log_every_steps': 1,
    },
}
COMMON = {'dataset.name': 'brain_tumor_coco', 'dataset.normalization': 'seed',
          'progress_bar': False, 'keep_checkpoints': 1,
          'keep_best_checkpoints': 1}


class TableError(RuntimeError):
  """A problem the user can fix (a run made with other settings, ...)."""


# ----------------------------------------------------------------- configs


def base_config(model: str):
  from configs import lintunet, unet  # pylint: disable=import-outside-toplevel
  if model == 'unet':
    return unet.get_config()
  if model == 'lintunet_seed':
    return lintunet.get_config('seed')
  config = lintunet.get_config()
  if model == 'block_sparse':
    config.model.attention.kind = 'block_sparse'
  elif model != 'lintunet':
    raise TableError(f'unknown model {model!r}; use {", ".join(MODELS)}')
  return config


def settings(scale: str, epochs: int | None = None) -> dict:
  """The config fields a scale sets (with an --epochs override)."""
  fields = {**COMMON, **SCALES[scale]}
  if epochs is not None:
    fields['num_epochs'] = int(epochs)
    if scale != 'full':  # the compressed step schedule follows the length
      fields['step_every_epochs'] = max(1, round(epochs / 4))
  return fields


def make_config(model: str, seed: int, fields: dict, data: str, tfds_dir: str):
  config = base_config(model)
  config.update_from_flattened_dict(dict(fields))
  config.dataset.manual_dir = data
  config.dataset.data_dir = tfds_dir
  config.seed = int(seed)
  return config


# ----------------------------------------------------------------- one run


def per_image_iou(tp, fp, fn) -> np.ndarray:
  """tp / (tp + fp + fn) per image; NaN where ground truth and prediction
  are both empty (no IoU: excluded from means, as nnU-Net does)."""
  tp, fp, fn = (np.asarray(x, np.float64) for x in (tp, fp, fn))
  union = tp + fp + fn
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(union > 0, tp / union, np.nan)


def run_one(model: str, seed: int, fields: dict, args) -> dict:
  """Trains (or resumes, or skips) one run and evaluates it on the test
  split once; returns the contents of its test_metrics.json."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  from lintunet_jax.evaluation import report as evaluation  # pylint: disable=import-outside-toplevel
  from lintunet_jax.training import checkpointing  # pylint: disable=import-outside-toplevel
  from lintunet_jax.training import loop as train_lib  # pylint: disable=import-outside-toplevel
  workdir = epath.Path(args.root) / model / f'seed{seed}'
  result_path = workdir / 'test_metrics.json'
  if result_path.exists():
    saved = json.loads(result_path.read_text())
    if saved.get('settings') != _jsonable(fields):
      raise TableError(
          f'{result_path} was made with other settings ({saved.get("settings")}); '
          f'this table uses {_jsonable(fields)}. Use another --root or delete it.')
    print(f'[seed_table] {model} seed {seed}: finished earlier, reusing {result_path}',
          flush=True)
    return saved
  config = make_config(model, seed, fields, args.data, args.tfds_dir)
  saved_config = workdir / 'config.json'
  if saved_config.exists():  # a killed run: resume only the same recipe
    previous = checkpointing.load_config(os.fspath(workdir))
    changed = {}
    for key, value in {**fields, 'seed': int(seed)}.items():
      node = previous
      for part in key.split('.'):
        node = node.get(part) if node is not None else None
      if node != value:
        changed[key] = (node, value)
    if changed:
      raise TableError(f'{workdir} holds a run with other settings '
                       f'({changed}); use another --root or delete it.')
  print(f'[seed_table] {model} seed {seed}: training in {workdir}', flush=True)
  start = time.perf_counter()
  train_lib.train_and_evaluate(config, os.fspath(workdir))
  train_s = time.perf_counter() - start
  start = time.perf_counter()
  best = checkpointing.best_checkpoint(os.fspath(workdir))
  if best is None:
    raise TableError(f'{workdir} has no checkpoint with validation metrics')
  config, trained, step, _ = evaluation.restore(os.fspath(workdir), best)
  output = evaluation.evaluate(trained, config, config.dataset.test_split,
                               resolution='native')
  eval_s = time.perf_counter() - start
  counts = output.per_image
  result = {
      'model': model, 'seed': int(seed), 'workdir': os.fspath(workdir),
      'settings': _jsonable(fields),
      'checkpoint_step': int(step),
      'validation': checkpointing.checkpoint_metrics(os.fspath(workdir), step),
      'test_split': config.dataset.test_split, 'resolution': output.resolution,
      'metrics': {k: output.metrics[k] for k in (*METRICS, 'accuracy',
                                                 'num_images', 'empty_images')},
      'num_parameters': evaluation.model_summary(trained, config)['num_parameters'],
      'train_s': round(train_s, 1), 'eval_s': round(eval_s, 1),
      # Foreground counts of every test image, by its index in the split.
      'per_image': {'index': counts['index'].tolist(),
                    **{k: counts[k][:, 0].tolist() for k in ('tp', 'fp', 'fn')}},
  }
  evaluation.write_json(os.fspath(result_path), result)
  print(f'[seed_table] {model} seed {seed}: test IoU {result["metrics"]["iou"]:.4f} '
        f'(step {step}; train {train_s:.0f} s, eval {eval_s:.0f} s)', flush=True)
  return result


def _jsonable(value):
  return json.loads(json.dumps(value))


# ------------------------------------------------------------- aggregation


def bootstrap_interval(values, *, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED, level: float = 0.95):
  """Percentile bootstrap interval of the mean of `values` (NaNs dropped)."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  if values.size == 0:
    return float('nan'), float('nan')
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, values.size, (resamples, values.size))
  means = values[picks].mean(axis=1)
  tail = (1 - level) / 2 * 100
  low, high = np.percentile(means, [tail, 100 - tail])
  return float(low), float(high)


def mean_std(values) -> dict:
  values = np.asarray(values, np.float64)
  return {'mean': float(values.mean()),
          'std': float(values.std(ddof=1)) if values.size > 1 else None,
          'n': int(values.size)}


def per_image_matrix(runs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
  """(image indices, per-image IoU [seeds, images]) of one model's runs."""
  index = np.asarray(runs[0]['per_image']['index'])
  rows = []
  for run in runs:
    if not np.array_equal(run['per_image']['index'], index):
      raise TableError(f'{run["workdir"]} evaluated other test images than '
                       f'{runs[0]["workdir"]}')
    p = run['per_image']
    rows.append(per_image_iou(p['tp'], p['fp'], p['fn']))
  return index, np.stack(rows)


def seed_mean(matrix: np.ndarray) -> np.ndarray:
  """Per image, the mean over seeds of the defined IoUs (NaN if none)."""
  counts = np.isfinite(matrix).sum(axis=0)
  sums = np.nansum(matrix, axis=0)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def aggregate(runs_by_model: dict[str, list[dict]]) -> dict:
  """Mean +- std over seeds of each metric, per model."""
  return {model: {metric: mean_std([r['metrics'][metric] for r in runs])
                  for metric in METRICS}
          for model, runs in runs_by_model.items()}


def differences(runs_by_model: dict[str, list[dict]], baseline: str = 'unet'
                ) -> tuple[dict, dict]:
  """Paired per-image IoU differences of each model against `baseline`.

  Returns ({model: difference summary}, {model: seed-mean IoU per image}).
  """
  per_image = {}
  index = None
  for model, runs in runs_by_model.items():
    idx, matrix = per_image_matrix(runs)
    if index is not None and not np.array_equal(idx, index):
      raise TableError(f'{model} evaluated other test images than the other models')
    index = idx
    per_image[model] = seed_mean(matrix)
  result = {}
  if baseline not in per_image:
    return result, per_image
  base_runs = {r['seed']: r for r in runs_by_model[baseline]}
  for model, ious in per_image.items():
    if model == baseline:
      continue
    diff = ious - per_image[baseline]
    finite = np.isfinite(diff)
    low, high = bootstrap_interval(diff)
    excludes = bool(low > 0 or high < 0)
    per_seed = {}
    for run in runs_by_model[model]:
      if run['seed'] in base_runs:
        _, pair = per_image_matrix([run, base_runs[run['seed']]])
        per_seed[str(run['seed'])] = float(np.nanmean(pair[0] - pair[1]))
    result[model] = {
        'against': baseline,
        'mean_difference': float(np.mean(diff[finite])) if finite.any() else None,
        'interval_95': [low, high],
        'num_images': int(finite.sum()),
        'images_excluded_empty': int((~finite).sum()),
        'distinguishable_from_zero': excludes,
        'verdict': verdict(model, baseline, low, high),
        'per_seed_difference': per_seed,
    }
  return result, per_image


def verdict(model: str, baseline: str, low: float, high: float) -> str:
  if not np.isfinite(low):
    return 'no image with a defined IoU for both models'
  if low > 0:
    return (f'{LABELS[model]} is better than {LABELS[baseline]}: the interval '
            'excludes zero (distinguishable from zero)')
  if high < 0:
    return (f'{LABELS[model]} is worse than {LABELS[baseline]}: the interval '
            'excludes zero (distinguishable from zero)')
  return 'the interval includes zero: not distinguishable from zero'


def disagreements(per_image: dict[str, np.ndarray], count: int) -> list[int]:
  """Positions (into the split order) of the images whose seed-mean IoUs
  differ most between any two models (largest max - min)."""
  matrix = np.stack(list(per_image.values()))
  with warnings.catch_warnings():  # an image no model has an IoU for: NaN
    warnings.simplefilter('ignore', RuntimeWarning)
    spread = np.nanmax(matrix, axis=0) - np.nanmin(matrix, axis=0)
  spread = np.where(np.isfinite(spread), spread, -np.inf)
  order = np.argsort(-spread, kind='stable')
  return [int(i) for i in order[:count] if spread[i] > 0]


# ------------------------------------------------------------------ outputs


def _fmt(summary: dict) -> str:
  std = summary['std']
  return f'{summary["mean"]:.4f}' + (f' ± {std:.4f}' if std is not None else '')


def markdown(table: dict) -> str:
  s = table['settings']
  lines = [
      f'# Seed comparison, scale `{table["scale"]}`', '',
      f'`{table["command"]}` ({table["created"]})', '',
      f'Test split of `{s["dataset.name"]}` ({table["num_test_images"]} images), '
      f'counted at each image\'s own size; checkpoint = best validation IoU. '
      f'{s["dataset.image_size"]}x{s["dataset.image_size"]}, width '
      f'{s["model.width"]}, batch {s["batch_size"]}, '
      + (f'{s["num_train_steps"]} steps' if s.get('num_train_steps', -1) > 0
         else f'{s["num_epochs"]} epochs')
      + f', {s.get("model.dtype", "float32")}; seeds {table["seeds"]}. '
      'Mean ± sample std (ddof=1) over seeds.', '',
      '| model | ' + ' | '.join(METRIC_LABELS[m] for m in METRICS) + ' |',
      '|---|' + '---|' * len(METRICS)]
  for model, summary in table['aggregates'].items():
    lines.append(f'| {LABELS[model]} | ' +
                 ' | '.join(_fmt(summary[m]) for m in METRICS) + ' |')
  if table['differences']:
    lines += ['', 'Per-image IoU against the U-Net, paired by image (each image\'s '
              'IoU averaged over seeds; images empty in truth and prediction '
              'have no IoU and are left out); percentile bootstrap 95 % '
              f'interval over images ({BOOTSTRAP_RESAMPLES:,} resamples).', '',
              '| model | mean difference | 95 % interval | images | per seed | verdict |',
              '|---|---|---|---|---|---|']
    for model, d in table['differences'].items():
      low, high = d['interval_95']
      per_seed = ', '.join(f'{v:+.4f}' for v in d['per_seed_difference'].values())
      mean = 'n/a' if d['mean_difference'] is None else f'{d["mean_difference"]:+.4f}'
      lines.append(f'| {LABELS[model]} | {mean} | [{low:+.4f}, {high:+.4f}] | '
                   f'{d["num_images"]} | {per_seed} | {d["verdict"]} |')
  return '\n'.join(lines) + '\n'


def plot(table: dict, path: str) -> str:
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  from lintunet_jax.evaluation import visualize  # pylint: disable=import-outside-toplevel
  models = list(table['aggregates'])
  fig = Figure(figsize=(9, 4), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  width = 0.8 / max(len(models), 1)
  x = np.arange(len(METRICS))
  for i, model in enumerate(models):
    summary = table['aggregates'][model]
    means = [summary[m]['mean'] for m in METRICS]
    stds = [summary[m]['std'] or 0.0 for m in METRICS]
    ax.bar(x + (i - (len(models) - 1) / 2) * width, means, width, yerr=stds,
           capsize=3, label=LABELS[model])
    for j, metric in enumerate(METRICS):  # each seed, so n=3 is visible
      values = [r['metrics'][metric] for r in table['runs'] if r['model'] == model]
      ax.plot([x[j] + (i - (len(models) - 1) / 2) * width] * len(values), values,
              'k.', markersize=3)
  ax.set_xticks(x, [METRIC_LABELS[m] for m in METRICS])
  ax.set_ylim(0, 1)
  ax.set_ylabel('test split (mean ± std over seeds)')
  ax.set_title(f'seed comparison, scale {table["scale"]}: seeds {table["seeds"]}')
  ax.legend(fontsize=8, loc='lower right')
  ax.grid(True, axis='y', alpha=0.3)
  fig.tight_layout()
  return visualize.save_figure(fig, path)


def predict_native(workdir: str, positions: list[int]):
  """(config, [(image, mask, prediction)]) of the best checkpoint in
  `workdir` on test examples `positions`, as predict.py computes masks
  (the one prediction loop, `stream.predict_native`), in `positions` order."""
  from lintunet_jax.data import pipeline as input_pipeline  # pylint: disable=import-outside-toplevel
  from lintunet_jax.evaluation import report as evaluation  # pylint: disable=import-outside-toplevel
  from lintunet_jax.evaluation import sliding_window  # pylint: disable=import-outside-toplevel
  from lintunet_jax.evaluation import stream  # pylint: disable=import-outside-toplevel
  config, model, _, _ = evaluation.restore(workdir, 'best')
  source = input_pipeline.prepare_dataset(config).as_data_source(config.dataset.test_split)
  settings = sliding_window.inference_settings(config)
  examples = ((k, np.asarray(source[position]['image']), np.asarray(source[position]['mask']))
              for k, position in enumerate(positions))
  out = {p.key: (p.image, p.extra, p.predicted) for p in stream.predict_native(
      sliding_window.make_predict_fn([model], settings), examples, config, settings,
      images_per_call=1)}
  return config, [out[k] for k in range(len(positions))]


def draw_disagreements(table: dict, runs_by_model: dict, positions: list[int],
                       path: str) -> str | None:
  from lintunet_jax.evaluation import visualize  # pylint: disable=import-outside-toplevel
  if not positions:
    return None
  seed = table['seeds'][0]
  predictions = {}
  for model, runs in runs_by_model.items():
    run = next(r for r in runs if r['seed'] == seed)
    _, predictions[model] = predict_native(run['workdir'], positions)
  index = table['test_index']
  cases = []
  for k, position in enumerate(positions):
    image, mask, _ = predictions[next(iter(predictions))][k]
    spread = table['disagreements'][k]['spread']
    cases.append((f'test #{index[position]} (spread {spread:.2f})', image, mask,
                  {LABELS[m].replace(' (', '\n('): predictions[m][k][2]
                   for m in predictions}))
  return visualize.save_comparison(
      path, cases, title=f'largest disagreements (seed {seed} predictions; '
      'TP green, FP red, FN blue)')


# --------------------------------------------------------------------- main


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--scale', choices=sorted(SCALES), default='cpu',
                      help="'cpu' (2-core machine) or 'full' (the seed's recipe); "
                           "'tiny' is for the tests")
  parser.add_argument('--data', default=None,
                      help=f'the seed\'s COCO export (default {DEFAULT_DATA} if present)')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--models', default=','.join(MODELS))
  parser.add_argument('--epochs', type=int, default=None,
                      help="override the scale's epochs (timing estimates)")
  parser.add_argument('--root', default=None,
                      help='workdirs (default workdirs/seed_table_<scale>)')
  parser.add_argument('--tfds-dir', default=None,
                      help='where the export is prepared (default <root>/tfds)')
  parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results'))
  args = parser.parse_args(argv)
  if args.data is None and DEFAULT_DATA.is_dir():
    args.data = str(DEFAULT_DATA)
  args.root = args.root or f'workdirs/seed_table_{args.scale}'
  if args.tfds_dir is None:  # one preparation of the export for the table
    from etils import epath  # pylint: disable=import-outside-toplevel
    args.tfds_dir = os.fspath(epath.Path(args.root) / 'tfds')
  args.seeds = [int(s) for s in args.seeds.split(',') if s.strip()]
  args.models = [m.strip() for m in args.models.split(',') if m.strip()]
  unknown = [m for m in args.models if m not in MODELS]
  if unknown:
    parser.error(f'unknown --models {unknown}; use {", ".join(MODELS)}')
  if not args.seeds:
    parser.error('--seeds is empty')
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  command = 'python benchmarks/seed_table.py ' + shlex.join(
      sys.argv[1:] if argv is None else list(argv))
  if not args.data:
    print(f'[seed_table] skipped: no --data and {DEFAULT_DATA} does not exist '
          '(the seed\'s Roboflow COCO export: train/ valid/ test/ with '
          '_annotations.coco.json)', flush=True)
    return 0
  from etils import epath  # pylint: disable=import-outside-toplevel
  if not epath.Path(args.data).is_dir():
    print(f'[seed_table] error: --data {args.data} is not a folder', file=sys.stderr)
    return 2
  from attention_benchmark import machine_info  # pylint: disable=import-outside-toplevel
  from lintunet_jax.evaluation import report as evaluation  # pylint: disable=import-outside-toplevel
  fields = settings(args.scale, args.epochs)
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR') and '://' not in args.root:
    import jax  # pylint: disable=import-outside-toplevel
    # The seeds of one model compile the same programs: compile them once.
    jax.config.update('jax_compilation_cache_dir',
                      os.path.abspath(os.path.join(args.root, 'jax_cache')))
  created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
  machine_start = machine_info()
  runs_by_model: dict[str, list[dict]] = {}
  try:
    for seed in args.seeds:  # seed-major: a partial table has every model
      for model in args.models:
        runs_by_model.setdefault(model, []).append(run_one(model, seed, fields, args))
  except TableError as e:
    print(f'[seed_table] error: {e}', file=sys.stderr)
    return 2
  runs = [r for model in args.models for r in runs_by_model[model]]
  diffs, per_image = differences(runs_by_model)
  index = runs[0]['per_image']['index']
  positions = disagreements(per_image, NUM_DISAGREEMENTS)
  name = f'seed_table_{args.scale}'
  out = epath.Path(args.out)
  table = {
      'scale': args.scale, 'command': command, 'created': created,
      'settings': _jsonable(fields), 'data': args.data, 'root': args.root,
      'seeds': args.seeds, 'models': args.models,
      'labels': {m: LABELS[m] for m in args.models},
      'num_test_images': len(index),
      'conventions': (
          'test split at native size, best-validation-IoU checkpoint; mean ± '
          'sample std (ddof=1) over seeds; per-image IoU NaN where truth and '
          'prediction are both empty (excluded from means); differences: per '
          'image, seed-mean IoU of the model minus the U-Net\'s, percentile '
          f'bootstrap over images, {BOOTSTRAP_RESAMPLES} resamples, numpy '
          f'default_rng({BOOTSTRAP_SEED})'),
      'machine': {'start': machine_start, 'end': machine_info()},
      'aggregates': aggregate({m: runs_by_model[m] for m in args.models}),
      'differences': diffs,
      'test_index': index,
      'per_image_iou_seed_mean': {m: [None if not np.isfinite(v) else float(v)
                                      for v in per_image[m]] for m in args.models},
      'disagreements': [
          {'position': p, 'index': index[p],
           'spread': float(np.nanmax([per_image[m][p] for m in args.models]) -
                           np.nanmin([per_image[m][p] for m in args.models])),
           'iou': {m: (None if not np.isfinite(per_image[m][p]) else float(per_image[m][p]))
                   for m in args.models}} for p in positions],
      'runs': [{k: v for k, v in r.items() if k != 'per_image'} for r in runs],
  }
  outputs = {'json': os.fspath(out / f'{name}.json'), 'markdown': os.fspath(out / f'{name}.md'),
             'plot': os.fspath(out / f'{name}.png'),
             'disagreements': os.fspath(out / f'{name}_disagreements.png')}
  table['outputs'] = outputs
  out.mkdir(parents=True, exist_ok=True)
  plot(table, outputs['plot'])
  outputs['disagreements'] = draw_disagreements(table, runs_by_model, positions,
                                                outputs['disagreements'])
  (out / f'{name}.md').write_text(markdown(table))
  evaluation.write_json(outputs['json'], table)
  print(markdown(table))
  for kind, path in outputs.items():
    print(f'[seed_table] wrote {kind}: {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
