r"""The whole inference pipeline as one `jax.export` artifact (StableHLO).

  python -m lintunet_jax.export --workdir DIR [--workdir DIR2 ...] \
      --output model.jaxexport [--checkpoint best|latest|STEP] \
      [--height H --width W] [--sliding_window|--nosliding_window] \
      [--overlap 0.5] [--tta none|flips] [--platforms cpu,cuda,tpu]

serialises, with the models' parameters baked in as constants,

  uint8 images [b, H, W, C]
    -> float in [0, 1], the config's normalisation ('unit', 'seed',
       'standardize': per-image z-score over H, W, C), as
       `transforms.to_unit_float` + `transforms.normalize` do in numpy
    -> the mean logits of the models (several --workdir: an ensemble), over
       `sliding_window.sliding_window_logits` (or the plain forward on
       model-size images), with the flips TTA if asked
    -> `metrics.predict_classes` at the config's threshold
    -> {'mask': uint8 [b, H, W] (0/1, or class ids), 'logits': float32
        [b, H, W, K]}

and writes it to --output, with a description next to it
(`<output>.json`: shapes, dtypes, normalisation, threshold, window
settings, workdirs and steps, platforms, jax version, how to load it).
Loading needs `jax` (and `flatbuffers`), not this package:

  from jax import export
  with open('model.jaxexport', 'rb') as f:
    exported = export.deserialize(bytearray(f.read()))
  out = exported.call(images)  # uint8 numpy/jax array [b, H, W, C]
  mask, logits = out['mask'], out['logits']

Fixed at export: H, W (the sliding window's tile positions depend on them)
and C (= model.in_channels; convert colour / gray before calling). The batch
b is symbolic: one artifact serves any batch size. Images of another size
need another export; without the sliding window only model-size images are
accepted, since predict.py's PIL resize cannot be reproduced bit for bit in
jnp.

Attention kernels: Pallas kernels lower to custom calls that lie outside
`jax.export`'s compatibility guarantee (and exist for one platform each), so
the models are always rebuilt with `model.attention.kernel='xla'` whatever
the saved config says (the parameters are the same for every kernel).

Symbolic batch: the block-sparse XLA attention plans its chunks from the
(concrete) batch size, so the models cannot trace a symbolic batch
directly; the pipeline is written for one image and `jax.vmap`ped over the
batch, which leaves every shape the models see concrete.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from absl import logging
from jax import export as jax_export

from lintunet_jax import metrics
from lintunet_jax import paths
from lintunet_jax.data import volume_config
from lintunet_jax.data.datasets import transforms
from lintunet_jax.evaluation import ensemble
from lintunet_jax.evaluation import report as evaluation
from lintunet_jax.evaluation import settings as eval_settings
from lintunet_jax.evaluation import inference_flags
from lintunet_jax.evaluation import sliding_window as sw

PLATFORMS = ('cpu', 'cuda', 'tpu')
KNOWN_PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
KERNEL = 'xla'  # the only attention kernel exported (see the docstring)
FORMAT_VERSION = 1
LOAD_SNIPPET = '''from jax import export
with open('{name}', 'rb') as f:
  exported = export.deserialize(bytearray(f.read()))
out = exported.call(images)  # uint8 [b, {height}, {width}, {channels}]
mask, logits = out['mask'], out['logits']'''


class ExportError(ValueError):
  """A user-facing problem: bad size, channels, platforms or workdirs."""


USER_ERRORS = (ExportError, *evaluation.USER_ERRORS)


def normalize(images: jax.Array, mode: str) -> jax.Array:
  """uint8 [B, H, W, C] -> float32 model input, per image.

  The jnp twin of `transforms.to_unit_float` + `transforms.normalize`
  (predict.py's numpy path): x / 255, then 'unit' as is, 'seed' clip(2x - 1,
  0, 1), 'standardize' (x - mean) / max(std, 1e-6) with the mean and the
  (population) std of each image over H, W and C.
  """
  x = images.astype(jnp.float32) / jnp.float32(255.0)
  if mode == 'unit':
    return x
  if mode == 'seed':
    return jnp.clip(2.0 * x - 1.0, 0.0, 1.0)
  if mode == 'standardize':
    mean, std = _mean_std(images, x)
    return (x - mean) / jnp.maximum(std, 1e-6)
  raise ExportError(f'the exported pipeline takes uint8 images: '
                    f'config.dataset.normalization must be one of '
                    f'{transforms.IMAGE_NORMALIZATIONS}, got {mode!r}')


def _mean_std(images: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-image mean and population std [B, 1, 1, 1] of x = images / 255.

  numpy sums pairwise; a plain float32 reduction in XLA can be off by 1e-3
  of a std on a low-contrast image. Here the mean comes from integer row
  sums (exact in float32 while W * C <= 65793, i.e. a row sums to < 2**24)
  and the variance from float32 row sums, then the sum of the rows.
  """
  pixels = int(np.prod(images.shape[1:]))
  rows = jnp.sum(images.astype(jnp.int32), axis=(2, 3)).astype(jnp.float32)
  mean = jnp.sum(rows, axis=1) / jnp.float32(255.0 * pixels)
  mean = mean[:, None, None, None]
  squares = jnp.sum(jnp.square(x - mean), axis=(2, 3))
  return mean, jnp.sqrt(jnp.sum(squares, axis=1) / pixels)[:, None, None, None]


def restore_members(workdirs: Sequence[str],
                    checkpoint: str | None) -> list[ensemble.Member]:
  """The models of `workdirs` (`ensemble.restore_members`, the restore and
  agreement checks of eval.py and predict.py), rebuilt with the XLA
  attention kernel, which every platform the artifact serves can run."""
  if not workdirs:
    raise ExportError('at least one --workdir is required')
  try:
    members = ensemble.restore_members(workdirs, checkpoint,
                                       overrides={'model.attention.kernel': KERNEL})
  except ensemble.IncompatibleMembers as e:
    raise ExportError(str(e)) from None
  if volume_config.is_volume_dataset(members[0].config):
    raise ExportError(
        f'{members[0].workdir} was trained on the slices of NIfTI volumes: the '
        'artifact takes uint8 images, so it cannot hold the volume path '
        '(normalisation with the training statistics, slicing, stacking); '
        'predict these workdirs with predict.py, which writes NIfTI volumes')
  return members


def check_geometry(settings: sw.InferenceSettings, height: int, width: int,
                   channels: int, in_channels: int) -> None:
  """Refuses what the artifact could not compute as predict.py does."""
  if height < 1 or width < 1:
    raise ExportError(f'--height and --width must be >= 1, got {height}x{width}')
  if channels != in_channels:
    raise ExportError(
        f'the images would have {channels} channel(s) but the model reads '
        f'model.in_channels={in_channels}: the artifact takes uint8 [b, H, W, '
        f'{in_channels}] images, so convert them first (gray <-> RGB, as '
        'predict.py does with transforms.to_channels) and export with '
        f'--channels={in_channels}')
  if not settings.window and (height, width) != (settings.tile_size,) * 2:
    raise ExportError(
        f'{height}x{width} images without the sliding window: the plain '
        f'forward takes only the model input size ({settings.tile_size}x'
        f'{settings.tile_size}); predict.py resizes other sizes with PIL, which '
        'cannot be reproduced exactly in the artifact. Use --sliding_window, '
        f'or --height={settings.tile_size} --width={settings.tile_size}')


def pipeline_fn(members: Sequence[ensemble.Member], settings: sw.InferenceSettings
                ) -> Callable[[jax.Array], dict[str, jax.Array]]:
  """uint8 [b, H, W, C] -> {'mask': uint8 [b, H, W], 'logits': float32
  [b, H, W, K]}: normalisation, `make_predict_fn` (ensemble, TTA, window)
  and the threshold. Traced, the parameters become constants."""
  config = members[0].config
  predict = sw.make_predict_fn([m.model for m in members], settings)

  def one_image(image):  # [H, W, C]: every shape the models see is concrete
    return predict(image[None])[0]

  def run(images):
    logits = jax.vmap(one_image)(normalize(images, config.dataset.normalization))
    mask = metrics.predict_classes(logits, config.threshold).astype(jnp.uint8)
    return {'mask': mask, 'logits': logits.astype(jnp.float32)}

  return run


def parse_platforms(text: str | Sequence[str]) -> tuple[str, ...]:
  names = [p.strip().lower() for p in (text.split(',') if isinstance(text, str) else text)]
  names = [p for p in names if p]
  unknown = [p for p in names if p not in KNOWN_PLATFORMS]
  if not names or unknown:
    raise ExportError(f'--platforms must be a comma-separated list of '
                      f'{KNOWN_PLATFORMS}, got {text!r}')
  return tuple(dict.fromkeys(names))


def export_with_fallback(fn: Callable, args: Sequence[jax.ShapeDtypeStruct],
                         platforms: Sequence[str], *,
                         export=jax_export.export, log=print
                         ) -> tuple[jax_export.Exported, dict[str, str]]:
  """jax.export for all `platforms` at once; if that lowering fails, each
  platform alone, dropping (with a message saying why) those that cannot be
  lowered here. Returns (Exported, {dropped platform: reason})."""
  jitted = jax.jit(fn)
  try:
    return export(jitted, platforms=tuple(platforms))(*args), {}
  except Exception as e:  # pylint: disable=broad-except
    if len(platforms) == 1:
      raise ExportError(f'cannot lower for {platforms[0]}: '
                        f'{type(e).__name__}: {e}') from e
    first_error = e
  dropped = {}
  for platform in platforms:
    try:
      export(jitted, platforms=(platform,))(*args)
    except Exception as e:  # pylint: disable=broad-except
      dropped[platform] = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
  kept = tuple(p for p in platforms if p not in dropped)
  if not kept:
    raise ExportError(f'cannot lower for any of {tuple(platforms)}: '
                      f'{type(first_error).__name__}: {first_error}')
  if not dropped:  # each lowers alone but not together: say so, do not guess
    raise ExportError(f'lowering for {tuple(platforms)} together failed, each '
                      f'alone works: {type(first_error).__name__}: {first_error}')
  for platform, reason in dropped.items():
    log(f'warning: cannot lower for {platform} on this machine ({reason}); '
        f'the artifact serves {", ".join(kept)} only', file=sys.stderr)
  return export(jitted, platforms=kept)(*args), dropped


def export_pipeline(workdirs: Sequence[str], *, checkpoint: str | None = None,
                    inference: eval_settings.InferenceChoice = eval_settings.InferenceChoice(),
                    height: int | None = None, width: int | None = None,
                    channels: int | None = None,
                    platforms: str | Sequence[str] = PLATFORMS,
                    log=print) -> tuple[bytes, dict]:
  """(serialised artifact, its description): everything but the writing.

  Defaults: H = W = the model input size; channels = model.in_channels;
  window, overlap, TTA and tile batch from the config's `inference` group
  with `inference`'s choices on top (`sliding_window.inference_settings`).
  """
  platforms = parse_platforms(platforms)
  members = restore_members(workdirs, checkpoint)
  config = members[0].config
  try:
    settings = inference.resolve(config)
  except ValueError as e:
    raise ExportError(str(e)) from None
  height = settings.tile_size if height is None else int(height)
  width = settings.tile_size if width is None else int(width)
  in_channels = int(config.model.in_channels)
  channels = in_channels if channels is None else int(channels)
  check_geometry(settings, height, width, channels, in_channels)
  batch, = jax_export.symbolic_shape('b')
  spec = jax.ShapeDtypeStruct((batch, height, width, channels), jnp.uint8)
  exported, dropped = export_with_fallback(pipeline_fn(members, settings),
                                           [spec], platforms, log=log)
  num_classes = int(config.model.num_classes)
  description = {
      'format': 'jax.export',
      'format_version': FORMAT_VERSION,
      'jax_version': jax.__version__,
      'platforms': list(exported.platforms),
      'platforms_dropped': dropped,
      'calling_convention_version': exported.calling_convention_version,
      'inputs': {'images': {'shape': ['b', height, width, channels],
                            'dtype': 'uint8',
                            'meaning': 'raw pixels 0..255, batch b any size'}},
      'outputs': {
          'mask': {'shape': ['b', height, width], 'dtype': 'uint8',
                   'meaning': ('0/1 (sigmoid(logit) > threshold)' if num_classes == 1
                               else f'class ids 0..{num_classes - 1} (argmax)')},
          'logits': {'shape': ['b', height, width, num_classes],
                     'dtype': 'float32',
                     'meaning': 'mean logits of the models (after TTA, blended)'}},
      'normalization': config.dataset.normalization,
      'threshold': float(config.threshold),
      'model': config.model.name,
      'attention_kernel': KERNEL,
      'model_input_size': settings.tile_size,
      'inference': settings.describe(),
      'members': [{'workdir': paths.absolute(m.workdir), 'step': int(m.step),
                   'checkpoint': str(m.selector)} for m in members],
  }
  return bytes(exported.serialize()), description


def write(output: str, artifact: bytes, description: dict) -> str:
  """Writes the artifact and `<output>.json` (with the loading snippet);
  returns the JSON's path."""
  target = paths.check(output, '--output')
  if not paths.is_url(output):
    target.parent.mkdir(parents=True, exist_ok=True)
  inputs = description['inputs']['images']['shape']
  description = dict(description, load=LOAD_SNIPPET.format(
      name=target.name, height=inputs[1], width=inputs[2], channels=inputs[3]))
  meta = f'{output}.json'
  paths.write_bytes(output, artifact)
  paths.write_text(meta, json.dumps(description, indent=2) + '\n')
  return meta


def _flags() -> flags.FlagValues:
  """The command line's flags, in their own FlagValues (importing this
  module defines nothing in absl's global FLAGS of eval.py / predict.py)."""
  fv = flags.FlagValues()
  flags.DEFINE_multi_string('workdir', None, 'Training workdir; several: an '
                            'ensemble (mean of the logits).', flag_values=fv)
  flags.DEFINE_string('output', None, 'Artifact path (local or gs://); the '
                      'description goes to <output>.json.', flag_values=fv)
  flags.DEFINE_string('checkpoint', None, "'best', 'latest' or a step (default:"
                      " 'best' when checkpoints have validation metrics, else "
                      "'latest').", flag_values=fv)
  flags.DEFINE_integer('height', None, 'Image height the artifact takes '
                       '(default: the model input size).', flag_values=fv)
  flags.DEFINE_integer('width', None, 'Image width (default: the model input '
                       'size).', flag_values=fv)
  flags.DEFINE_integer('channels', None, 'Image channels (must equal '
                       'model.in_channels; the default).', flag_values=fv)
  inference_flags.define(fv)
  flags.DEFINE_string('platforms', ','.join(PLATFORMS), 'Comma-separated '
                      f'platforms to lower for, of {KNOWN_PLATFORMS}.',
                      flag_values=fv)
  return fv


def main(argv: Sequence[str]) -> int:
  fv = _flags()
  try:
    rest = fv(list(argv))[1:]
  except flags.Error as e:
    print(f'export: error: {e}', file=sys.stderr)
    return 2
  if rest:
    print(f'export: error: unexpected arguments {rest}', file=sys.stderr)
    return 2
  if not fv.workdir or not fv.output:
    print('export: error: --workdir and --output are required', file=sys.stderr)
    return 2
  logging.set_verbosity(logging.ERROR)  # orbax's read-only notices
  try:
    paths.check(fv.output, '--output')
    artifact, description = export_pipeline(
        fv.workdir, checkpoint=fv.checkpoint, height=fv.height,
        width=fv.width, channels=fv.channels,
        platforms=fv.platforms,
        inference=eval_settings.InferenceChoice(
            **{name: fv[name].value for name in inference_flags.NAMES}))
    meta = write(fv.output, artifact, description)
  except USER_ERRORS as e:
    print(f'export: error: {e}', file=sys.stderr)
    return 2
  images = description['inputs']['images']['shape']
  print(f'wrote {fv.output} ({len(artifact) / 1e6:.1f} MB: uint8 '
        f'[b, {images[1]}, {images[2]}, {images[3]}] -> mask, logits; '
        f'{", ".join(description["platforms"])}; '
        f'{len(description["members"])} model(s)) and {meta}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
