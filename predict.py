r"""Segment new images with a trained model, or the mean of several.

  python predict.py --workdir DIR [--workdir DIR2 ...] --input PATH [PATH...] \
      --output OUTDIR [--checkpoint best|latest|STEP] [--save-logits] \
      [--overlay] [--recursive] [--sliding_window|--nosliding_window] \
      [--overlap 0.5] [--tta none|flips] [--tile_batch_size N]

PATH: image files or folders (their image files); DIR, PATH and OUTDIR may
be gs:// URLs (docs/evaluation.md). For each image
`<stem>.<ext>` it writes OUTDIR/<stem>.png, the mask at the image's own
size (0/255 for binary models, class ids for multi-class ones); with
`--overlay` also <stem>_overlay.png, and with `--save-logits` <stem>.npy,
the float32 logits: [S, S, C] at model resolution, or [H, W, C] at the
image's own size with the sliding window. Images that cannot be read
are skipped with a warning and listed at the end; the exit status is 1 if
any was skipped, 2 if nothing could be done.

`--sliding_window` predicts each image at its own size, tile by tile
(tiles of the model's input size, `--overlap` of a tile between
neighbours, Gaussian blending; nnU-Net's way), instead of resizing it to
the model's size; it is the default for models trained on patches
(dataset.patch_size). `--tta flips` averages the logits of the four
mirrorings. Several `--workdir`s are an ensemble (e.g. the folds of a
cross-validation): their logits are averaged; they must agree on input
size, channels, classes and normalisation, and the first's threshold and
preprocessing are used. Work is split over all local devices.
predictions.json records every workdir and step and the inference settings.

NIfTI inputs (CASE_0000.nii.gz files, or folders of them such as
nnU-Net's imagesTs/) of a workdir trained on volume slices are predicted
slice by slice and written as OUTDIR/CASE.nii.gz label volumes with the
input's geometry (with `--save_probabilities` also CASE.npz), normalised
with the statistics stored at training (docs/evaluation.md, "Volumes").

`--config.a.b=value` changes one field of the saved config, e.g.
`--config.model.attention.kernel=xla` off GPU for a model trained with the
Pallas kernel; `--config=FILE` replaces the saved config.
"""

from __future__ import annotations

import pathlib

import json
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lintunet_jax.data import volume_config
from lintunet_jax.data import volumes
from lintunet_jax.evaluation import inference_flags

_WORKDIR = flags.DEFINE_multi_string(
    'workdir', None, 'Training workdir; give it several times for an '
    'ensemble (the mean of the models\' logits).')
_INPUT = flags.DEFINE_multi_string(
    'input', None, 'Image files or folders; several may follow one --input.')
_OUTPUT = flags.DEFINE_string('output', None, 'Output folder.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, "'best', 'latest' or a step (default: 'best' when "
    "checkpoints have validation metrics, else 'latest').")
# The default file only gives `--config.a.b=value` its field types (as in eval.py).
_CONFIG = config_flags.DEFINE_config_file(
    'config', str(pathlib.Path(__file__).resolve().parent / 'configs' / 'default.py'),
    'Optional config file replacing the one saved in the workdir. Without '
    'it, --config.a.b=value overrides apply to the saved config (e.g. '
    '--config.model.attention.kernel=xla).', lock_config=True)
_SAVE_LOGITS = flags.DEFINE_boolean(
    'save-logits', False, 'Also save raw logits as .npy at model resolution.')
_OVERLAY = flags.DEFINE_boolean('overlay', False, 'Also save overlay PNGs.')
_SAVE_PROBABILITIES = flags.DEFINE_boolean(
    'save_probabilities', False, 'Volumes: also save OUT/CASE.npz with the '
    'class probabilities [K, X, Y, Z] (nnU-Net\'s flag).')
_RECURSIVE = flags.DEFINE_boolean('recursive', False, 'Descend into sub-folders.')
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', None, "Images per batch (default: the config's "
    'eval_batch_size; 1 with the sliding window, whose tiles are the batch).')
_INFERENCE = inference_flags.define()
_REQUIRE_ACCELERATOR = flags.DEFINE_boolean(
    'require_accelerator', None, 'Stop at once if JAX finds no GPU/TPU '
    "(default: --config's require_accelerator if --config is given, else False).")


def _restore():
  """(members, the first's config, inference settings), or None after
  printing why not."""
  from lintunet_jax.evaluation import ensemble  # pylint: disable=import-outside-toplevel
  from lintunet_jax.evaluation import report as evaluation  # pylint: disable=import-outside-toplevel
  if flags.FLAGS['config'].present:
    config, overrides = _CONFIG.value, None
  else:
    config = None
    overrides = dict(config_flags.get_override_values(flags.FLAGS['config'])) or None
  try:
    members = ensemble.restore_members(_WORKDIR.value, _CHECKPOINT.value,
                                       config, overrides=overrides)
    config = members[0].config
    settings = inference_flags.choice(_INFERENCE).resolve(config)
  except (*evaluation.USER_ERRORS, ValueError) as e:
    print(f'predict.py: error: {e}', file=sys.stderr)
    return None
  for m in members:
    print(f'{m.config.model.name} from {m.workdir}, checkpoint {m.selector} '
          f'(step {m.step})')
  return members, config, settings


def _is_volume_input(path: str) -> bool:
  """A NIfTI file, or a local folder holding one (nnU-Net's imagesTs/)."""
  from lintunet_jax import paths  # pylint: disable=import-outside-toplevel
  if volumes.is_nifti(path):
    return True
  folder = pathlib.Path(path)
  return (not paths.is_url(path) and folder.is_dir()
          and any(volumes.is_nifti(child) for child in folder.iterdir()))


def _predict_volumes(inputs: list[str], output) -> int:
  """predict.py on NIfTI volumes (volume_prediction): OUT/CASE.nii.gz."""
  import jax  # pylint: disable=import-outside-toplevel
  from lintunet_jax import paths  # pylint: disable=import-outside-toplevel
  from lintunet_jax.evaluation import sliding_window  # pylint: disable=import-outside-toplevel
  from lintunet_jax.evaluation import volume_prediction  # pylint: disable=import-outside-toplevel
  from lintunet_jax.training import parallel  # pylint: disable=import-outside-toplevel
  not_for_volumes = [name for name, holder in (('--save-logits', _SAVE_LOGITS),
                                               ('--overlay', _OVERLAY),
                                               ('--recursive', _RECURSIVE))
                     if holder.value]
  if not_for_volumes:
    print(f'predict.py: error: {", ".join(not_for_volumes)}: for 2-D images; '
          'volumes write CASE.nii.gz (and CASE.npz with --save_probabilities)',
          file=sys.stderr)
    return 2
  restored = _restore()
  if restored is None:
    return 2
  members, config, settings = restored
  first = members[0]
  statistics = volume_config.read_statistics(first.workdir)
  if not volume_config.is_volume_dataset(config) or statistics is None:
    print(f'predict.py: error: NIfTI inputs need a workdir trained on volumes '
          f'(configs/lintunet.py:volumes_quick, which records '
          f'{volume_config.STATISTICS_FILE}); {first.workdir} has none',
          file=sys.stderr)
    return 2
  try:
    cases = volumes.prediction_cases(inputs, int(config.model.in_channels))
    predict_fn = sliding_window.make_predict_fn(
        [m.model for m in members], settings,
        mesh=parallel.create_mesh(jax.local_devices()))
    summary = volume_prediction.predict_cases(
        predict_fn, cases, config, settings, statistics, _OUTPUT.value,
        images_per_call=_BATCH_SIZE.value,
        save_probabilities=_SAVE_PROBABILITIES.value)
  except (ValueError, FileNotFoundError) as e:
    print(f'predict.py: error: {e}', file=sys.stderr)
    return 2
  paths.write_text(output / 'predictions.json', json.dumps(
      {'workdir': paths.absolute(first.workdir), 'step': first.step,
       'checkpoint': str(first.selector),
       'members': [m.describe() for m in members],
       'inference': settings.describe(),
       'normalization': f'{first.workdir}/{volume_config.STATISTICS_FILE}',
       'slicing_axis': statistics['slicing_axis'],
       'written': summary.written}, indent=2))
  print(f'wrote {len(summary.written)} volume(s) to {_OUTPUT.value}: {summary.line()}')
  return 0


def main(argv):
  # `--input a b c`: absl keeps one value per --input; the rest arrive as argv.
  inputs = list(_INPUT.value or []) + list(argv[1:])
  if not _WORKDIR.value or not _OUTPUT.value or not inputs:
    raise app.UsageError('--workdir, --output and at least one --input are required')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.ERROR)
  from lintunet_jax import paths  # pylint: disable=import-outside-toplevel
  try:  # a URL nothing can write to fails before any work
    output = paths.check(_OUTPUT.value, '--output')
    for workdir in _WORKDIR.value:
      paths.check(workdir, '--workdir')
  except paths.UnsupportedPathError as e:
    print(f'predict.py: error: {e}', file=sys.stderr)
    return 2
  import jax  # pylint: disable=import-outside-toplevel
  from lintunet_jax.evaluation import prediction  # pylint: disable=import-outside-toplevel
  from lintunet_jax.evaluation import settings as eval_settings  # pylint: disable=import-outside-toplevel
  from lintunet_jax.training import parallel  # pylint: disable=import-outside-toplevel
  try:
    print(parallel.format_platform(parallel.check_accelerator(
        _CONFIG.value, required=_REQUIRE_ACCELERATOR.value)))
  except parallel.NoAcceleratorError as e:
    print(f'predict.py: error: {e}', file=sys.stderr)
    return 2
  if any(_is_volume_input(i) for i in inputs):
    return _predict_volumes(inputs, output)
  try:
    files, skipped, _ = prediction.collect_inputs(inputs, recursive=_RECURSIVE.value)
  except paths.UnsupportedPathError as e:
    print(f'predict.py: error: {e}', file=sys.stderr)
    return 2
  if not files:  # say so before spending time on the model
    print('predict.py: error: no input image found:', file=sys.stderr)
    print(prediction.format_skipped(skipped), file=sys.stderr)
    return 2
  restored = _restore()
  if restored is None:
    return 2
  members, config, settings = restored
  if volume_config.is_volume_dataset(config):
    print(f'predict.py: error: {members[0].workdir} was trained on the slices of '
          'NIfTI volumes: give its volumes as --input (CASE_0000.nii.gz files or '
          'a folder of them, e.g. imagesTs/), not 2-D images', file=sys.stderr)
    return 2
  size = settings.tile_size
  print(f'input {size}px; ' + (
      f'sliding window (overlap {settings.overlap:g}) at each image\'s size'
      if settings.window else f'images resized to {size}px')
        + f', tta {settings.tta}'
        + (f', mean of {len(members)} models' if len(members) > 1 else ''))
  mesh = parallel.create_mesh(jax.local_devices())
  try:
    summary = prediction.predict_paths(
        [m.model for m in members], config, inputs, _OUTPUT.value,
        eval_settings.PredictOptions(
            batch_size=_BATCH_SIZE.value, save_logits=_SAVE_LOGITS.value,
            overlays=_OVERLAY.value, recursive=_RECURSIVE.value),
        settings=settings, mesh=mesh)
  except prediction.PredictionError as e:
    print(f'predict.py: error: {e}', file=sys.stderr)
    return 2
  output.mkdir(parents=True, exist_ok=True)
  first = members[0]
  paths.write_text(output / 'predictions.json', json.dumps(
      {'workdir': paths.absolute(first.workdir), 'step': first.step,
       'checkpoint': str(first.selector), 'threshold': config.threshold,
       'members': [m.describe() for m in members],
       'inference': settings.describe(),
       'written': summary.written,
       'skipped': [{'input': p, 'reason': r} for p, r in summary.skipped],
       'ignored': summary.ignored}, indent=2))
  print(f'wrote {len(summary.written)} mask(s) to {_OUTPUT.value}')
  if summary.ignored:
    print(f'ignored {len(summary.ignored)} non-image file(s) in the input '
          'folders (see predictions.json)')
  if summary.skipped:
    print(f'skipped {len(summary.skipped)} input(s):', file=sys.stderr)
    print(prediction.format_skipped(summary.skipped), file=sys.stderr)
  if not summary.written:
    print('predict.py: error: no input image could be processed', file=sys.stderr)
    return 2
  return 1 if summary.skipped else 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
