"""Segment new images with a trained model: what `predict.py` does.

  summary = prediction.predict_paths(model, config, ['scan.png', 'folder/'], 'out/',
                                     PredictOptions(save_logits=True, overlays=True))
  summary = prediction.predict_paths([fold0, fold1], config, inputs, 'out/',
                                     settings=inference_settings(config,
                                         sliding_window=True, tta='flips'))

Inputs are image files or folders (their image files, sorted; with
`PredictOptions(recursive=True)` also those of sub-folders). Each image is
read with `image_io.read_image` (the one decoder, so prediction sees what
training saw) and predicted through `stream.predict_native` (the loop
eval.py's window / TTA / ensemble mode uses too) with
`sliding_window.make_predict_fn` (one model or the mean of several, with
the settings' TTA); `settings` (default `inference_settings(config)`)
choose the geometry: resized to the model's size and the mask brought
back, or tiled at the image's own size with the window.

Per input `<stem>` it writes to the output folder:
  <stem>.png          the mask at the input's size: 0/255 for binary models,
                      class ids 0..C-1 for multi-class models (uint8 L).
  <stem>_overlay.png  with `overlays`: image | prediction, side by side.
  <stem>.npy          with `save_logits`: float32 raw logits (the ensemble's
                      mean, after TTA): [S, S, C] at model resolution
                      (before resizing back) without the window, [H, W, C]
                      at the image's own size with it.

An input that cannot be read is skipped with a warning; the others are
still processed and the skipped ones are listed in the summary.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import sys
from typing import Iterable, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from lintunet_jax import paths
from lintunet_jax.data import image_io
from lintunet_jax.evaluation import settings as eval_settings
from lintunet_jax.evaluation import sliding_window
from lintunet_jax.evaluation import stream
from lintunet_jax.evaluation import visualize


class PredictionError(ValueError):
  """Prediction cannot start (e.g. the output would overwrite an input)."""


def warn(message: str) -> None:
  """A warning on stderr that does not break a progress bar."""
  import tqdm  # pylint: disable=import-outside-toplevel
  tqdm.tqdm.write(f'warning: {message}', file=sys.stderr)


@dataclasses.dataclass
class PredictSummary:
  written: list[dict] = dataclasses.field(default_factory=list)
  # Inputs that could not be processed: missing, unreadable, unsupported.
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  # Files in input folders without an image suffix (not attempted).
  ignored: list[str] = dataclasses.field(default_factory=list)


def _identity(path) -> str:
  """One key per file: resolved local paths, URLs as they are."""
  return os.fspath(path) if paths.is_url(path) else os.fspath(pathlib.Path(path).resolve())


def collect_inputs(inputs: Sequence[str | os.PathLike], *, recursive: bool = False
                   ) -> tuple[list[pathlib.Path], list[tuple[str, str]], list[str]]:
  """(image files to process, [(path, why skipped)], [ignored files]).

  Files named explicitly are always tried (the reader decides whether they
  are images); in folders, files with an image suffix
  (`image_io.IMAGE_SUFFIXES`) are taken and other non-hidden files are
  returned as ignored. Missing paths and folders without any image file are
  skipped (with the reason). Inputs may be gs:// URLs (files or folders).
  """
  files: list[pathlib.Path] = []
  skipped: list[tuple[str, str]] = []
  ignored: list[str] = []
  seen = set()

  def add(path: pathlib.Path):
    key = _identity(path)
    if key not in seen:
      seen.add(key)
      files.append(path)

  for raw in inputs:
    path = (paths.check(raw, '--input') if paths.is_url(raw)
            else pathlib.Path(raw))
    if path.is_dir():
      pattern = '**/*' if recursive else '*'
      entries = sorted(p for p in path.glob(pattern) if p.is_file()
                       and not any(part.startswith('.') for part in
                                   p.relative_to(path).parts))
      images = [p for p in entries if p.suffix.lower() in image_io.IMAGE_SUFFIXES]
      ignored += [str(p) for p in entries
                  if p.suffix.lower() not in image_io.IMAGE_SUFFIXES]
      if not images:
        skipped.append((str(path), f'folder has no image files (looked for '
                                   f'{", ".join(image_io.IMAGE_SUFFIXES)}'
                                   f'{"" if recursive else "; sub-folders need --recursive"}'
                                   f'; found {len(entries)} other file(s))'))
      for p in images:
        add(p)
    elif path.exists():
      add(path)
    else:
      skipped.append((str(path), 'no such file or folder'))
  return files, skipped, ignored


def output_stems(files: Sequence[pathlib.Path]) -> list[str]:
  """File stems, made unique by '-2', '-3', ... where two inputs share one."""
  counts: dict[str, int] = {}
  stems = []
  taken = set()
  for path in files:
    stem = path.stem
    counts[stem] = counts.get(stem, 0) + 1
    candidate = stem if counts[stem] == 1 else f'{stem}-{counts[stem]}'
    while candidate in taken:
      counts[stem] += 1
      candidate = f'{stem}-{counts[stem]}'
    if candidate != stem:
      warn(f'{path}: another input has the stem {stem!r}; writing {candidate!r}')
    taken.add(candidate)
    stems.append(candidate)
  return stems


def make_forward(model: nnx.Module):
  """jit(images [B,S,S,C]) -> logits [B,S,S,K], in inference mode."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, images):
    module = nnx.merge(graphdef, state)
    module.eval()
    return module(images)

  return lambda images: forward(state, images)


def mask_to_png_array(mask: np.ndarray, num_classes: int) -> np.ndarray:
  """uint8 mask for saving: 0/255 for binary models, class ids otherwise."""
  mask = np.asarray(mask)
  if num_classes == 1:
    return np.where(mask > 0, 255, 0).astype(np.uint8)
  return mask.astype(np.uint8)


def predict_paths(model: nnx.Module | Sequence[nnx.Module],
                  config: ml_collections.ConfigDict,
                  inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  options: eval_settings.PredictOptions = eval_settings.PredictOptions(),
                  *, settings: sliding_window.InferenceSettings | None = None,
                  mesh: jax.sharding.Mesh | None = None) -> PredictSummary:
  """Masks (and, per `options`, overlays and logits) for every readable input.

  `model`: one model, or several (an ensemble: their logits averaged) that
  read `config`'s input. `settings`: window / TTA (default
  `sliding_window.inference_settings(config)`). `mesh`: devices to split
  each call's rows over (predict.py: all local devices).
  """
  batch_size, save_logits = options.batch_size, options.save_logits
  overlays, recursive, progress = options.overlays, options.recursive, options.progress
  files, skipped, ignored = collect_inputs(inputs, recursive=recursive)
  summary = PredictSummary(skipped=list(skipped), ignored=ignored)
  for path, why in skipped:
    warn(f'skipping {path}: {why}')
  if ignored:
    warn(f'ignoring {len(ignored)} file(s) without an image suffix in the '
         f'input folders, e.g. {ignored[0]}')
  if not files:
    return summary
  out_dir = paths.check(out_dir, '--output')
  stems = output_stems(files)
  sources = {_identity(f) for f in files}
  for stem in stems:
    for suffix in ('.png', '_overlay.png', '.npy'):
      target = _identity(out_dir / f'{stem}{suffix}')
      if target in sources:
        raise PredictionError(
            f'writing {target} would overwrite an input image; choose an '
            '--output folder that is not an input folder')
  out_dir.mkdir(parents=True, exist_ok=True)
  settings = settings or sliding_window.inference_settings(config)
  batch_size = stream.images_per_call(batch_size, config, settings)
  batch_size = max(1, min(batch_size, len(files)))
  num_classes = config.model.num_classes
  members = list(model) if isinstance(model, (list, tuple)) else [model]
  forward = sliding_window.make_predict_fn(members, settings, mesh=mesh)
  import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm.tqdm(total=len(files), desc='predict', unit='img',
                  disable=not (len(files) > 1 if progress is None else progress))

  def skip(path, why):
    warn(f'skipping {path}: {why}')
    summary.skipped.append((str(path), why))
    bar.update(1)

  def readable():
    for path, stem in zip(files, stems):
      try:
        yield path, image_io.read_image(path), stem
      except image_io.ImageReadError as e:
        skip(path, e.problem)

  for p in stream.predict_native(forward, readable(), config, settings,
                                 images_per_call=batch_size, keep_logits=save_logits,
                                 on_error=lambda path, e: skip(path, str(e))):
    path, original, stem, mask = p.key, p.image, p.extra, p.predicted
    entry = {'input': str(path), 'mask': str(out_dir / f'{stem}.png'),
             'original_size': list(original.shape[:2]),
             'foreground_fraction': float(np.mean(mask > 0))}
    png = io.BytesIO()
    Image.fromarray(mask_to_png_array(mask, num_classes)).save(png, format='PNG')
    paths.write_bytes(entry['mask'], png.getvalue())
    if save_logits:
      entry['logits'] = str(out_dir / f'{stem}.npy')
      array = io.BytesIO()
      np.save(array, p.logits.astype(np.float32))
      paths.write_bytes(entry['logits'], array.getvalue())
    if overlays:
      entry['overlay'] = visualize.save_overlay(
          out_dir / f'{stem}_overlay.png', original, None, mask,
          num_classes=max(num_classes, 2), title=path.name)
    summary.written.append(entry)
    bar.update(1)
  bar.close()
  return summary


def format_skipped(skipped: Iterable[tuple[str, str]]) -> str:
  lines = [f'  {path}: {why}' for path, why in skipped]
  return '\n'.join(lines)
