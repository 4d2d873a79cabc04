r"""Evaluate a trained workdir: metrics over a whole split, throughput, pictures.

  python eval.py --workdir DIR [--workdir DIR2 ...] [--checkpoint best|latest|STEP] \
      [--split test] [--report PATH] [--compare DIR3] [--resolution native|model] \
      [--sliding_window|--nosliding_window] [--overlap 0.5] [--tta none|flips] \
      [--tile_batch_size N] [--config.a.b=value ...] [--config configs/x.py[:variant]]

Restores the checkpoint and the config saved with it, evaluates every
image of the split once, times the jit-compiled forward pass at batch sizes
1, 8 and the config's, and writes

  DIR/eval/<split>-<step>.json        the report (docs/evaluation.md)
  DIR/eval/<split>-<step>.cases.json  per-case metrics, nnU-Net's summary.json
                                      layout (native resolution only)
  DIR/eval/<split>-<step>/            overlays and training_curves.png

and prints a table. DIR, PATH and DIR2 may be gs:// URLs (docs/evaluation.md).
`--compare DIR2` evaluates DIR2 the same way (its report
goes to DIR2/eval/) and prints both side by side, e.g. U-Net vs LinTUNet.

Metrics count pixels at each image's own size (`--resolution native`, the
default): the predicted mask is brought back exactly as predict.py writes it
(resize or padding undone) and compared with the stored mask, so the numbers
are comparable with published ones. `--resolution model` counts on the
model's image_size canvas instead, as training validation does; padding
added by `resize='pad'` is never counted. The report's `resolution` field
and the table's "Counted at" row say which. At native resolution each image
is also a case of per-case metrics (Dice, IoU, normalized surface Dice at
`--nsd_tolerance` pixels, HD95), written in nnU-Net's summary.json layout.

Sliding window, TTA, ensembles (docs/evaluation.md): `--sliding_window`
predicts each image at its own size tile by tile (the default for models
trained with dataset.patch_size), `--tta flips` averages the four
mirrorings, and several `--workdir`s (e.g. 5 cross-validation folds) are
averaged as one ensemble. In any of these modes every image is predicted
by `sliding_window.make_predict_fn` and counted at its own size (no loss
is computed: the table shows n/a); the report's `inference` field and the
table's "Inference" row state the settings. An ensemble's report goes to
DIR/eval/<split>-ensemble<N>-<step>.json (DIR, step: the first workdir's);
its throughput is the first model's plain forward pass.

`--config.a.b=value` changes one field of the saved config, e.g.
`--config.model.attention.kernel=xla` to evaluate off GPU a model trained
with the Pallas kernel, or `--config.dataset.data_dir=...`; the checkpoint
must still fit the model. `--config=FILE` replaces the saved config.
"""

from __future__ import annotations

import dataclasses
import pathlib

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lintunet_jax.evaluation import inference_flags

_WORKDIR = flags.DEFINE_multi_string(
    'workdir', None, 'Training workdir to evaluate; give it several times to '
    "evaluate an ensemble (the mean of the models' logits).")
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, "'best' (highest validation IoU), 'latest' or a step "
    "number. Default: 'best' when checkpoints have validation metrics, else "
    "'latest'.")
_SPLIT = flags.DEFINE_string(
    'split', None, "Split to evaluate (default: the config's dataset.test_split).")
_REPORT = flags.DEFINE_string(
    'report', None, 'Report path (default DIR/eval/<split>-<step>.json, '
    'for an ensemble of N the first DIR/eval/<split>-ensemble<N>-<step>.json); '
    'pictures go to the same path without .json.')
# The default file only gives `--config.a.b=value` its field types; without
# --config=FILE the overrides apply to the config saved in the workdir.
_CONFIG = config_flags.DEFINE_config_file(
    'config', str(pathlib.Path(__file__).resolve().parent / 'configs' / 'default.py'),
    'Optional config file replacing the one saved in the workdir. Without '
    'it, --config.a.b=value overrides apply to the saved config (e.g. '
    '--config.model.attention.kernel=xla, --config.dataset.data_dir=DIR).',
    lock_config=True)
_RESOLUTION = flags.DEFINE_enum(
    'resolution', 'native', ['native', 'model'],
    "Where pixels are counted: 'native' (each image's own size, the predicted "
    "mask brought back as predict.py does) or 'model' (the model's "
    'image_size canvas, as training validation; padding never counted).')
_NSD_TOLERANCE = flags.DEFINE_float(
    'nsd_tolerance', 2.0, 'Tolerance of the normalized surface Dice in the '
    "per-case metrics (--resolution native), in pixels of each image's own "
    'size (in mm for a workdir trained on NIfTI volumes, evaluated per volume). '
    'Default 2: one pixel is the floor of any two delineations (hand '
    'drawing, the nearest-neighbour resize back), and a thin structure only a '
    'few pixels wide should not pass when off by its own width.', lower_bound=0.0)
_COMPARE = flags.DEFINE_string(
    'compare', None, 'A second workdir, evaluated on the same split and shown '
    'side by side.')
_COMPARE_CHECKPOINT = flags.DEFINE_string(
    'compare_checkpoint', None, "Checkpoint of --compare (default: as "
    "--checkpoint, or its default when that is a step number).")
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', None, "Eval batch size (default: the config's "
    'eval_batch_size; with the sliding window, images per call, default 1: '
    'the tiles are the batch).')
_NUM_OVERLAYS = flags.DEFINE_integer('num_overlays', 4, 'Overlay PNGs to save.')
_THROUGHPUT = flags.DEFINE_boolean('throughput', True, 'Time the forward pass.')
_TP_BATCH_SIZES = flags.DEFINE_list(
    'throughput_batch_sizes', None, "Batch sizes to time (default: 1,8,the "
    "config's eval_batch_size).")
_TP_RUNS = flags.DEFINE_integer('throughput_runs', 20, 'Timed calls per batch size.')
_TP_WARMUP = flags.DEFINE_integer('throughput_warmup', 3, 'Untimed warm-up calls.')
_PEAK_FLOPS = flags.DEFINE_float(
    'peak_flops', None, "Peak FLOP/s of one device, for '% of peak' (default: "
    'a datasheet table of common accelerators; none for CPUs).')
_TRAIN_THROUGHPUT = flags.DEFINE_boolean(
    'train_throughput', False, 'Also time a training step (forward, backward, '
    "update) at the config's batch_size; compiling it takes a while.")
_PROGRESS = flags.DEFINE_boolean('progress', True, 'Show a progress bar.')
_INFERENCE = inference_flags.define()
_REQUIRE_ACCELERATOR = flags.DEFINE_boolean(
    'require_accelerator', None, 'Stop at once if JAX finds no GPU/TPU '
    "(default: --config's require_accelerator if --config is given, else "
    'False: a checkpoint trained on a GPU may be evaluated on a laptop).')


def quiet_libraries() -> None:
  """Library INFO/WARNING chatter (orbax, XLA) off unless --verbosity is given."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.ERROR)


def config_and_overrides():
  """(config file's config or None, {'a.b': value} overrides or None).

  With --config=FILE the file's config (its overrides applied) replaces the
  saved one; without it, the overrides go on top of the saved config.
  """
  if flags.FLAGS['config'].present:
    return _CONFIG.value, None
  return None, dict(config_flags.get_override_values(flags.FLAGS['config'])) or None


def _settings(checkpoint: str | None, split: str | None, report: str | None):
  """EvalSettings from the flags (built once; `--compare` changes the first three)."""
  from lintunet_jax.evaluation import settings  # pylint: disable=import-outside-toplevel
  try:
    batch_sizes = (tuple(int(b) for b in _TP_BATCH_SIZES.value)
                   if _TP_BATCH_SIZES.value else None)
  except ValueError:
    raise app.UsageError('--throughput_batch_sizes takes integers, e.g. 1,8,32, '
                         f'got {",".join(_TP_BATCH_SIZES.value)}') from None
  return settings.EvalSettings(
      checkpoint=checkpoint, split=split, resolution=_RESOLUTION.value,
      report_path=report, num_overlays=_NUM_OVERLAYS.value,
      batch_size=_BATCH_SIZE.value, progress=_PROGRESS.value,
      nsd_tolerance=_NSD_TOLERANCE.value,
      inference=inference_flags.choice(_INFERENCE),
      throughput=settings.ThroughputSettings(
          measure=_THROUGHPUT.value, batch_sizes=batch_sizes, runs=_TP_RUNS.value,
          warmup=_TP_WARMUP.value, peak_flops=_PEAK_FLOPS.value,
          train_step=_TRAIN_THROUGHPUT.value))


def _evaluate(workdir: str | list[str], settings, config, overrides) -> dict:
  from lintunet_jax.evaluation import whole_image_eval  # pylint: disable=import-outside-toplevel
  return whole_image_eval.run(workdir, settings, config=config, overrides=overrides)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  quiet_libraries()
  from lintunet_jax.evaluation import report as evaluation  # pylint: disable=import-outside-toplevel
  from lintunet_jax.training import distributed  # pylint: disable=import-outside-toplevel
  from lintunet_jax.training import parallel  # pylint: disable=import-outside-toplevel
  config, overrides = config_and_overrides()
  try:
    distributed.maybe_initialize_distributed(config)  # before any device use
    print(parallel.format_platform(parallel.check_accelerator(
        config, required=_REQUIRE_ACCELERATOR.value)))
  except (distributed.DistributedSetupError, parallel.NoAcceleratorError) as e:
    print(f'eval.py: error: {e}', file=sys.stderr)
    return 2
  try:
    settings = _settings(_CHECKPOINT.value, _SPLIT.value, _REPORT.value)
    report = _evaluate(_WORKDIR.value, settings, config, overrides)
    reports = [report]
    if _COMPARE.value:
      checkpoint = _COMPARE_CHECKPOINT.value or (
          _CHECKPOINT.value if _CHECKPOINT.value and not _CHECKPOINT.value.isdigit()
          else None)
      other = _evaluate(_COMPARE.value, dataclasses.replace(
          settings, checkpoint=checkpoint, split=report['data']['split'],
          report_path=None), None, overrides)
      reports.append(other)
      report = evaluation.attach_comparison(report, other)
  except evaluation.USER_ERRORS as e:
    print(f'eval.py: error: {e}', file=sys.stderr)
    return 2
  print()
  print(evaluation.format_table(reports))
  for r in reports:
    for note in r.get('notes', []):
      print(f'note ({r["model"]["name"]}): {note}')
    print(f"\nreport: {r['report_path']}")
    if r.get('per_case'):
      print(f"per-case metrics: {r['per_case']['path']}")
    if r['artifacts'].get('overlays') or r['artifacts'].get('training_curves'):
      print(f"pictures: {r['artifacts']['folder']}")
  return 0


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(lambda argv: sys.exit(main(argv)))
