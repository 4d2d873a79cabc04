"""predict.py on NIfTI volumes: nnU-Net's `2d` inference.

  cases = volumes.prediction_cases(['imagesTs/'], num_channels=2)
  summary = volume_prediction.predict_cases(predict_fn, cases, config, settings,
                                            statistics, 'out/')

Each case's channel files are read and checked (`volumes.read_channels`),
normalised with the statistics stored in the workdir when training started
(`volume_config.read_statistics`: CT's foreground percentiles, mean and std
of the training set, never the test volume's own; other channels their
per-case z-score, as in training), cut into slices across the slicing axis
training used, predicted through the one prediction loop
(`stream.predict_native`: batched, with the sliding window, flips and
ensembles of `predict_fn`), and stacked back into a label volume of the
input's shape, written as `OUT/CASE.nii.gz` with the input's affine and
header (spacing, orientation codes), so it opens aligned over the image in
3D Slicer or ITK-SNAP. With `save_probabilities`, `OUT/CASE.npz` holds
`probabilities` float32 [K, X, Y, Z] (softmax over the classes, in the
NIfTI array's axis order), as nnU-Net's `--save_probabilities` does.

Every file is written whole under a temporary name and renamed
(`paths.write_bytes`), so OUT never holds a partial file; a bad case stops
the run with its file named, after the cases before it were written.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import nibabel as nib
import numpy as np

from lintunet_jax import paths
from lintunet_jax.data import pipeline as input_pipeline
from lintunet_jax.data import volumes
from lintunet_jax.evaluation import sliding_window as sw
from lintunet_jax.evaluation import stream


@dataclasses.dataclass
class VolumeSummary:
  written: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  slices: int = 0
  seconds: float = 0.0

  def line(self) -> str:
    seconds = max(self.seconds, 1e-9)
    return (f'{len(self.written)} volume(s), {self.slices} slices in '
            f'{self.seconds:.1f} s: {len(self.written) / seconds:.2f} volumes/s, '
            f'{self.slices / seconds:.1f} slices/s')


def _probabilities(logits: np.ndarray) -> np.ndarray:
  """[..., K] logits -> [..., K'] probabilities (K' = 2 for one sigmoid logit)."""
  logits = np.asarray(logits, np.float64)
  if logits.shape[-1] == 1:
    p = 1.0 / (1.0 + np.exp(-logits))
    return np.concatenate([1.0 - p, p], axis=-1).astype(np.float32)
  shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)


def predict_volume(predict_fn: Callable[[jax.Array], jax.Array],
                   volume: volumes.Volume, config: ml_collections.ConfigDict,
                   settings: sw.InferenceSettings, statistics: Mapping[str, Any], *,
                   images_per_call: int, probabilities: bool = False
                   ) -> tuple[np.ndarray, np.ndarray | None]:
  """(labels uint8 [X, Y, Z], probabilities float32 [K, X, Y, Z] or None)
  of one volume, predicted slice by slice across statistics['slicing_axis']."""
  axis = int(statistics['slicing_axis'])
  image = volumes.normalize(volume.image, statistics['normalization'])
  shape = volume.image.shape[:3]
  labels = np.zeros(shape, np.uint8)
  probs = None
  planes = ((z, plane, None) for z, plane in enumerate(volumes.slices(image, axis)))
  for p in stream.predict_native(predict_fn, planes, config, settings,
                                 images_per_call=images_per_call,
                                 keep_logits=probabilities):
    where = [slice(None)] * 3
    where[axis] = p.key
    labels[tuple(where)] = p.predicted
    if probabilities:
      plane = _probabilities(p.logits)
      if not settings.window:  # model size -> the slice's own (as the mask)
        plane = input_pipeline.restore_mask_size(plane, p.predicted.shape, config)
      if probs is None:
        probs = np.zeros((plane.shape[-1], *shape), np.float32)
      probs[(slice(None), *where)] = np.moveaxis(plane, -1, 0)
  return labels, probs


def nifti_bytes(labels: np.ndarray, affine: np.ndarray, header) -> bytes:
  """A .nii.gz of `labels` with the input's affine and header (its
  spacing and orientation codes), as integer labels with no scaling."""
  out = nib.Nifti1Image(labels.astype(np.uint8), affine, header=header.copy())
  out.set_data_dtype(np.uint8)
  out.header.set_slope_inter(1.0, 0.0)
  return gzip.compress(out.to_bytes(), compresslevel=6)


def predict_cases(predict_fn: Callable[[jax.Array], jax.Array],
                  cases: Sequence[volumes.Case], config: ml_collections.ConfigDict,
                  settings: sw.InferenceSettings, statistics: Mapping[str, Any],
                  out_dir: str | os.PathLike, *, images_per_call: int | None = None,
                  save_probabilities: bool = False, progress: bool = True
                  ) -> VolumeSummary:
  """Predicts and writes every case (OUT/CASE.nii.gz [, CASE.npz])."""
  import tqdm  # pylint: disable=import-outside-toplevel
  out_dir = paths.check(out_dir, '--output')
  out_dir.mkdir(parents=True, exist_ok=True)
  per_call = stream.images_per_call(images_per_call, config, settings)
  summary = VolumeSummary()
  start = time.perf_counter()
  for case in tqdm.tqdm(cases, desc='predict', unit='volume', disable=not progress):
    volume, header = volumes.read_channels(case.case_id, case.images)
    labels, probs = predict_volume(predict_fn, volume, config, settings, statistics,
                                   images_per_call=per_call,
                                   probabilities=save_probabilities)
    entry = {'case': case.case_id, 'inputs': [str(p) for p in case.images],
             'mask': str(out_dir / f'{case.case_id}.nii.gz'),
             'shape': list(labels.shape), 'spacing': volume.spacing.tolist(),
             'labels_present': np.unique(labels).tolist()}
    paths.write_bytes(entry['mask'], nifti_bytes(labels, volume.affine, header))
    if probs is not None:
      entry['probabilities'] = str(out_dir / f'{case.case_id}.npz')
      buffer = io.BytesIO()
      np.savez_compressed(buffer, probabilities=probs)
      paths.write_bytes(entry['probabilities'], buffer.getvalue())
    summary.written.append(entry)
    summary.slices += labels.shape[int(statistics['slicing_axis'])]
  summary.seconds = time.perf_counter() - start
  return summary
