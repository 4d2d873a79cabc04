"""The one loop that runs a predictor over images at their own size.

  predict_fn = sliding_window.make_predict_fn([m.model for m in members], settings)
  for p in stream.predict_native(predict_fn, examples, config, settings,
                                 images_per_call=8):
    p.key, p.image, p.extra, p.predicted     # predicted: class ids [H, W]

Used by eval.py's window / TTA / ensemble evaluation
(`whole_image_eval.evaluate`), predict.py's writer
(`prediction.predict_paths`) and the seed table's pictures. Training's eval
step keeps its loops (`training.loop.evaluate` on the model's canvas;
`report.evaluate_native`, whose report has a loss that logits cannot give).
Images of one shape are batched (`images_per_call` per call, padded, so
each shape compiles once); at most IN_FLIGHT + 1 calls wait on the device
while the host counts and writes. Predictions come back in the order of
their calls (grouped by shape): consumers key them by `Prediction.key`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lintunet_jax import metrics
from lintunet_jax.data import pipeline
from lintunet_jax.data import whole_images
from lintunet_jax.evaluation import sliding_window as sw

IN_FLIGHT = 2  # calls queued on the device before the host drains the oldest


def images_per_call(requested: int | None, config: ml_collections.ConfigDict,
                    settings: sw.InferenceSettings) -> int:
  """`requested`, or the default: with the window one image per call (its
  tiles already fill the device, and images of their own sizes rarely
  share a shape), else the eval batch."""
  return int(requested or (1 if settings.window else config.eval_batch_size))


def prepare(image: np.ndarray, config: ml_collections.ConfigDict,
            settings: sw.InferenceSettings) -> np.ndarray:
  """A stored or read image -> float32 model input: normalised at its own
  size with the window, else resized to the model's; ValueError if it
  cannot be the model's input."""
  try:
    prepared = (whole_images.native_input(image, config) if settings.window
                else pipeline.preprocess_image(image, config))
  except (ValueError, TypeError) as e:
    raise ValueError(f'cannot be preprocessed ({e})') from None
  prepared = np.asarray(prepared, np.float32)
  channels, size = int(config.model.in_channels), settings.tile_size
  expected = ((*prepared.shape[:2], channels) if settings.window
              else (size, size, channels))
  if prepared.shape != expected:
    raise ValueError(f'preprocessed to {prepared.shape}, model expects {expected}')
  return prepared


@dataclasses.dataclass
class Prediction:
  """`predicted`: class ids at the image's own size; `logits` (keep_logits):
  in `prepare`'s geometry ([S, S, K] without the window, [H, W, K] with it)."""
  key: Any
  image: np.ndarray
  extra: Any
  predicted: np.ndarray
  logits: np.ndarray | None = None


def predict_native(predict_fn: Callable[[jax.Array], jax.Array],
                   examples: Iterable[tuple[Any, np.ndarray, Any]],
                   config: ml_collections.ConfigDict,
                   settings: sw.InferenceSettings, *, images_per_call: int,
                   keep_logits: bool = False,
                   on_error: Callable[[Any, ValueError], None] | None = None
                   ) -> Iterator[Prediction]:
  """Predictions of `predict_fn` (from `sliding_window.make_predict_fn`
  with these `settings`) for `examples`: (key, image, extra) triples, the
  `extra` (e.g. the true mask) handed back untouched. An image `prepare`
  refuses goes to `on_error(key, error)` and is skipped, or raises without
  it. `config` gives the preprocessing and the threshold."""
  if images_per_call < 1:
    raise ValueError(f'images per call must be >= 1, got {images_per_call}')
  waiting: dict[tuple[int, ...], list] = {}  # shape -> [(key, image, extra, prepared)]
  in_flight: list = []  # (logits on the device, items), oldest first

  def dispatch(shape):
    items = waiting.pop(shape)
    batch = np.zeros((images_per_call, *shape), np.float32)
    for i, item in enumerate(items):
      batch[i] = item[3]
    in_flight.append((predict_fn(jnp.asarray(batch)), items))

  def drain() -> Iterator[Prediction]:
    logits, items = in_flight.pop(0)
    classes = np.asarray(metrics.predict_classes(logits, config.threshold))
    host_logits = np.asarray(logits) if keep_logits else None
    for i, (key, image, extra, _) in enumerate(items):
      predicted = (classes[i] if settings.window else  # else back to its size
                   pipeline.restore_mask_size(classes[i], np.shape(image)[:2], config))
      yield Prediction(key, image, extra, np.asarray(predicted),
                       None if host_logits is None else host_logits[i])

  for key, image, extra in examples:
    try:
      prepared = prepare(image, config, settings)
    except ValueError as e:
      if on_error is None:
        raise
      on_error(key, e)
      continue
    group = waiting.setdefault(prepared.shape, [])
    group.append((key, image, extra, prepared))
    if len(group) == images_per_call:
      dispatch(prepared.shape)
    if len(in_flight) > IN_FLIGHT:
      yield from drain()
  for shape in list(waiting):
    dispatch(shape)
    if len(in_flight) > IN_FLIGHT:
      yield from drain()
  while in_flight:
    yield from drain()
