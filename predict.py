r"""Segment new images with a trained model.

  python predict.py --workdir DIR --input PATH [PATH...] --output OUTDIR \
      [--checkpoint best|latest|STEP] [--save-logits] [--overlay] [--recursive]

PATH: image files or folders (their image files); DIR, PATH and OUTDIR may
be gs:// URLs (docs/evaluation.md). For each image
`<stem>.<ext>` it writes OUTDIR/<stem>.png, the mask at the image's own
size (0/255 for binary models, class ids for multi-class ones); with
`--overlay` also <stem>_overlay.png, and with `--save-logits` <stem>.npy,
the float32 logits [S, S, C] at model resolution. Images that cannot be read
are skipped with a warning and listed at the end; the exit status is 1 if
any was skipped, 2 if nothing could be done.

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

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir.')
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
_RECURSIVE = flags.DEFINE_boolean('recursive', False, 'Descend into sub-folders.')
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', None, "Images per batch (default: the config's eval_batch_size).")
_REQUIRE_ACCELERATOR = flags.DEFINE_boolean(
    'require_accelerator', None, 'Stop at once if JAX finds no GPU/TPU '
    "(default: --config's require_accelerator if --config is given, else False).")


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
    paths.check(_WORKDIR.value, '--workdir')
  except paths.UnsupportedPathError as e:
    print(f'predict.py: error: {e}', file=sys.stderr)
    return 2
  from lintunet_jax.evaluation import report as evaluation  # pylint: disable=import-outside-toplevel
  from lintunet_jax.evaluation import prediction  # pylint: disable=import-outside-toplevel
  from lintunet_jax.training import parallel  # pylint: disable=import-outside-toplevel
  try:
    print(parallel.format_platform(parallel.check_accelerator(
        _CONFIG.value, required=_REQUIRE_ACCELERATOR.value)))
  except parallel.NoAcceleratorError as e:
    print(f'predict.py: error: {e}', file=sys.stderr)
    return 2
  try:
    files, skipped, _ = prediction.collect_inputs(inputs, recursive=_RECURSIVE.value)
  except paths.UnsupportedPathError as e:
    print(f'predict.py: error: {e}', file=sys.stderr)
    return 2
  if not files:  # say so before spending time on the model
    print('predict.py: error: no input image found:', file=sys.stderr)
    print(prediction.format_skipped(skipped), file=sys.stderr)
    return 2
  if flags.FLAGS['config'].present:
    config, overrides = _CONFIG.value, None
  else:
    config = None
    overrides = dict(config_flags.get_override_values(flags.FLAGS['config'])) or None
  try:
    config, model, step, selector = evaluation.restore(
        _WORKDIR.value, _CHECKPOINT.value, config, overrides=overrides)
  except evaluation.USER_ERRORS as e:
    print(f'predict.py: error: {e}', file=sys.stderr)
    return 2
  print(f'{config.model.name} from {_WORKDIR.value}, checkpoint {selector} '
        f'(step {step}), input {config.dataset.image_size}px')
  try:
    summary = prediction.predict_paths(
        model, config, inputs, _OUTPUT.value, batch_size=_BATCH_SIZE.value,
        save_logits=_SAVE_LOGITS.value, overlays=_OVERLAY.value,
        recursive=_RECURSIVE.value)
  except prediction.PredictionError as e:
    print(f'predict.py: error: {e}', file=sys.stderr)
    return 2
  output.mkdir(parents=True, exist_ok=True)
  paths.write_text(output / 'predictions.json', json.dumps(
      {'workdir': paths.absolute(_WORKDIR.value), 'step': step,
       'checkpoint': str(selector), 'threshold': config.threshold,
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
