"""Medical volumes of nnU-Net v2 raw datasets: reading, checks, slicing axis
and intensity normalisation, with no TFDS or JAX in sight.

A raw dataset is a local folder `DatasetXXX_Name/` with `dataset.json`
(`channel_names`, `labels`, `numTraining`, `file_ending`), `imagesTr/` with
one file per case and channel (`CASE_0000.nii.gz`, `CASE_0001.nii.gz`...),
`labelsTr/CASE.nii.gz`, and optionally `imagesTs/` and `labelsTs/`.

Volumes are read with nibabel: it reads NIfTI (the format of every public
nnU-Net dataset: the Decathlon, BraTS, KiTS, AMOS) from pure Python wheels
and gives the affine directly, which is what writing predictions back with
the input's geometry needs. SimpleITK would add NRRD/MHA at the price of a
large compiled dependency and a second geometry convention (origin,
direction, spacing in reversed axis order); it can come later.

Normalisation is nnU-Net's default per `channel_names` entry:
  * 'CT' (any case): clip to the 0.5 and 99.5 percentiles of the foreground
    (label > 0) voxels of that channel over all training cases, then
    z-score with their mean and standard deviation (of the unclipped
    voxels, as nnU-Net's fingerprint computes them). nnU-Net samples up to
    10^7 voxels; using all of them is the exact form of the same rule.
  * anything else: z-score with the case's own mean and std.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np

from lintunet_jax import paths
from lintunet_jax.data.datasets.report import DataError

DATASET_JSON = 'dataset.json'
# Splits of a raw dataset: folder of images, folder of labels.
TRAIN_FOLDERS = ('imagesTr', 'labelsTr')
TEST_FOLDERS = ('imagesTs', 'labelsTs')
CT = 'ct'
# nnU-Net's floor for the standard deviation in its z-scores.
MIN_STD = 1e-8


@dataclasses.dataclass(frozen=True)
class RawDataset:
  """What dataset.json declares, checked."""

  folder: Path
  name: str
  channel_names: tuple[str, ...]  # by channel index
  labels: Mapping[str, int]  # name -> value (nnU-Net's layout)
  file_ending: str

  @property
  def num_channels(self) -> int:
    return len(self.channel_names)

  @property
  def num_classes(self) -> int:
    """Background included: label values are 0..num_classes-1."""
    return max(self.labels.values()) + 1

  @property
  def schemes(self) -> tuple[str, ...]:
    """Each channel's normalisation: 'ct' or 'zscore'."""
    return tuple(CT if name.strip().lower() == CT else 'zscore'
                 for name in self.channel_names)


@dataclasses.dataclass(frozen=True)
class Case:
  case_id: str
  images: tuple[Path, ...]  # one per channel
  label: Path | None


@dataclasses.dataclass
class Volume:
  """A case's channels [X, Y, Z, C] (float32), label [X, Y, Z] and geometry."""

  case_id: str
  image: np.ndarray
  label: np.ndarray | None
  affine: np.ndarray  # 4x4, voxel index -> mm (RAS+, NIfTI's convention)
  spacing: np.ndarray  # 3, mm per voxel along each array axis


def local_folder(path: str | os.PathLike, what: str) -> Path:
  """The raw dataset folder as a local path; URLs are refused up front."""
  if paths.is_url(path):
    raise ValueError(
        f'{what} {os.fspath(path)!r}: raw volume datasets are read with '
        'nibabel, which reads local files only; copy the dataset to a local '
        'disk (gsutil -m cp -r or gcloud storage cp -r) and point to the copy. '
        'The prepared dataset (config.dataset.data_dir) may still be gs://')
  folder = Path(os.path.expanduser(os.fspath(path))).resolve()
  if not folder.is_dir():
    raise FileNotFoundError(f'{folder}: {what} does not exist or is not a folder')
  return folder


def read_dataset_json(folder: str | os.PathLike) -> RawDataset:
  """dataset.json of a raw dataset, with the fields we rely on checked."""
  folder = local_folder(folder, 'config.dataset.manual_dir')
  path = folder / DATASET_JSON
  if not path.is_file():
    raise DataError(path, 'missing: an nnU-Net raw dataset has a dataset.json '
                    'beside imagesTr/ and labelsTr/')
  try:
    meta = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(path, f'not valid JSON ({e})') from None
  if not isinstance(meta, dict):
    raise DataError(path, 'must hold a JSON object')
  for key in ('channel_names', 'labels'):
    if not isinstance(meta.get(key), dict) or not meta[key]:
      raise DataError(path, f'has no {key!r} (nnU-Net v2 raw format: e.g. '
                      '"channel_names": {"0": "CT"}, '
                      '"labels": {"background": 0, "tumour": 1})')
  try:
    order = sorted((int(k), str(v)) for k, v in meta['channel_names'].items())
  except ValueError:
    raise DataError(path, 'channel_names keys must be channel indices "0", "1", ...') from None
  if [i for i, _ in order] != list(range(len(order))):
    raise DataError(path, f'channel_names keys must be 0..{len(order) - 1}, got '
                    f'{sorted(meta["channel_names"])}')
  labels = {}
  for name, value in meta['labels'].items():
    if isinstance(value, (list, tuple)):
      raise DataError(path, f'label {name!r} is a region (a list of values); '
                      'region-based labels are not supported')
    if not isinstance(value, int) or value < 0 or value > 255:
      raise DataError(path, f'label {name!r} must be an integer 0..255, got {value!r}')
    labels[str(name)] = value
  values = sorted(labels.values())
  if values[0] != 0 or values != list(range(len(values))):
    raise DataError(path, f'label values must be 0, 1, ..., N with 0 the '
                    f'background, got {values}')
  ending = meta.get('file_ending', '.nii.gz')
  if ending not in ('.nii.gz', '.nii'):
    raise DataError(path, f'file_ending {ending!r}: only NIfTI (.nii.gz, .nii) '
                    'is read')
  return RawDataset(folder=folder, name=str(meta.get('name') or folder.name),
                    channel_names=tuple(name for _, name in order),
                    labels=labels, file_ending=ending)


def find_cases(dataset: RawDataset, image_folder: str,
               label_folder: str | None) -> list[Case]:
  """The cases of one image folder, each with all its channels.

  Case ids come from the channel-0 files (`CASE_0000<ending>`); a case whose
  other channel files or label file are missing is an error naming the
  missing file.
  """
  images = dataset.folder / image_folder
  if not images.is_dir():
    return []
  ending = dataset.file_ending
  suffix = '_0000' + ending
  ids = sorted(p.name[:-len(suffix)] for p in images.iterdir()
               if p.name.endswith(suffix))
  cases = []
  for case_id in ids:
    files = []
    for channel in range(dataset.num_channels):
      path = images / f'{case_id}_{channel:04d}{ending}'
      if not path.is_file():
        raise DataError(path, f'missing: dataset.json declares '
                        f'{dataset.num_channels} channels '
                        f'({", ".join(dataset.channel_names)}), so case '
                        f'{case_id!r} needs one file per channel')
      files.append(path)
    label = None
    if label_folder is not None:
      label = dataset.folder / label_folder / f'{case_id}{ending}'
      if not label.is_file():
        raise DataError(label, f'missing: the label of case {case_id!r} '
                        f'({files[0].name})')
    cases.append(Case(case_id, tuple(files), label))
  return cases


def _load(path: Path) -> nib.spatialimages.SpatialImage:
  try:
    return nib.load(str(path))
  except Exception as e:  # nibabel raises several types for bad files
    raise DataError(path, f'not a readable NIfTI file ({type(e).__name__}: {e})') from None


def _spacing(image) -> np.ndarray:
  return np.asarray(image.header.get_zooms()[:3], dtype=np.float64)


def _array(image, path: Path, dtype) -> np.ndarray:
  if len(image.shape) != 3:
    extra = ('; nnU-Net raw datasets hold one 3-D file per channel '
             '(CASE_0000, CASE_0001, ...), so split the channels into '
             'separate files' if len(image.shape) == 4 else '')
    raise DataError(path, f'a {len(image.shape)}-D image of shape '
                    f'{tuple(image.shape)}; expected a 3-D volume{extra}')
  try:
    return np.asarray(image.dataobj, dtype=dtype)
  except Exception as e:
    raise DataError(path, f'corrupt or truncated ({type(e).__name__}: {e})') from None


def read_channels(case_id: str, files: Sequence[Path]) -> tuple[Volume, Any]:
  """One case's channel files -> (Volume without label, the first file's
  NIfTI header), checked: 3-D, finite, one geometry for all channels.
  (The header lets predictions be written with the input's own.)"""
  channels, affine, spacing, shape, header = [], None, None, None, None
  for path in files:
    image = _load(path)
    pixels = _array(image, path, np.float32)
    if not np.isfinite(pixels).all():
      bad = int(np.size(pixels) - np.isfinite(pixels).sum())
      raise DataError(path, f'{bad} voxel(s) are NaN or infinite')
    if affine is None:
      affine, spacing, shape = image.affine, _spacing(image), pixels.shape
      header = image.header
    else:
      _same_geometry(path, files[0], pixels.shape, image.affine, shape, affine)
    channels.append(pixels)
  volume = Volume(case_id, np.stack(channels, axis=-1), None,
                  np.asarray(affine, dtype=np.float64), spacing)
  return volume, header


def read_case(dataset: RawDataset, case: Case) -> Volume:
  """The case's channels, label and geometry, checked for what breaks training.

  Channels must share the label's shape and affine (nnU-Net checks the
  same; a mismatch means the files do not describe the same voxels).
  """
  volume, _ = read_channels(case.case_id, case.images)
  if case.label is not None:
    image = _load(case.label)
    raw = _array(image, case.label, np.float64)
    _same_geometry(case.label, case.images[0], raw.shape, image.affine,
                   volume.image.shape[:3], volume.affine)
    declared = sorted(dataset.labels.values())
    values = np.unique(raw)
    unknown = [v for v in values.tolist() if v not in declared]
    if unknown:
      shown = ', '.join(f'{v:g}' for v in unknown[:10])
      raise DataError(case.label, f'label value(s) {shown} are not declared in '
                      f'{DATASET_JSON} (labels: {dict(dataset.labels)})')
    volume.label = raw.astype(np.uint8)
  return volume


NIFTI_ENDINGS = ('.nii.gz', '.nii')
_CHANNEL_FILE = re.compile(r'^(?P<case>.+)_(?P<channel>\d{4})(?P<ending>\.nii\.gz|\.nii)$')


def is_nifti(path: str | os.PathLike) -> bool:
  return os.fspath(path).endswith(NIFTI_ENDINGS)


def prediction_cases(inputs: Sequence[str | os.PathLike],
                     num_channels: int) -> list[Case]:
  """Cases to predict, in nnU-Net's naming (`CASE_0000.nii.gz`,
  `CASE_0001.nii.gz`, ... one file per channel): each input is a folder of
  such files (imagesTs/) or one channel file, whose sibling channel files
  are found by name. A case must have exactly `num_channels` files
  (`_0000` .. `_{num_channels-1:04d}`); the error names what is missing or
  extra."""
  groups: dict[tuple[Path, str], dict[int, Path]] = {}
  for given in inputs:
    path = Path(os.path.expanduser(os.fspath(given)))
    if paths.is_url(given):
      raise ValueError(f'{os.fspath(given)}: volumes are read with nibabel, '
                       'which reads local files only; copy them to a local disk')
    if path.is_dir():
      candidates = sorted(p for p in path.iterdir() if is_nifti(p))
      if not candidates:
        raise FileNotFoundError(f'{path}: no NIfTI file (.nii.gz, .nii) in this folder')
    elif path.is_file():
      match = _CHANNEL_FILE.match(path.name)
      if match is None:
        raise DataError(path, 'not named CASE_XXXX.nii.gz (nnU-Net\'s naming: '
                        'one file per channel, _0000 for the first)')
      candidates = sorted(path.parent.glob(f'{glob.escape(match["case"])}_*'))
    else:
      raise FileNotFoundError(f'{path}: no such file or folder')
    for candidate in candidates:
      match = _CHANNEL_FILE.match(candidate.name)
      if match is None:
        raise DataError(candidate, 'not named CASE_XXXX.nii.gz (nnU-Net\'s '
                        'naming: one file per channel, _0000 for the first)')
      group = groups.setdefault((candidate.parent, match['case']), {})
      group[int(match['channel'])] = candidate.resolve()
  cases = []
  for (folder, case_id), files in sorted(groups.items()):
    for channel in range(num_channels):
      if channel not in files:
        ending = Path(next(iter(files.values()))).name[len(case_id) + 5:]
        raise DataError(folder / f'{case_id}_{channel:04d}{ending}',
                        f'missing: the model reads {num_channels} channel(s), so '
                        f'case {case_id!r} needs one file per channel')
    extra = sorted(c for c in files if c >= num_channels)
    if extra:
      raise DataError(files[extra[0]], f'case {case_id!r} has channel {extra[0]} '
                      f'but the model reads {num_channels} channel(s) '
                      f'(_0000 .. _{num_channels - 1:04d})')
    cases.append(Case(case_id, tuple(files[c] for c in range(num_channels)), None))
  return cases


def _same_geometry(path, reference_path, shape, affine, ref_shape, ref_affine) -> None:
  if tuple(shape) != tuple(ref_shape):
    raise DataError(path, f'shape {tuple(shape)} differs from '
                    f'{reference_path.name}\'s {tuple(ref_shape)}')
  if not np.allclose(affine, ref_affine, rtol=0, atol=1e-4):
    raise DataError(path, f'affine differs from {reference_path.name}\'s '
                    '(the files do not describe the same voxels):\n'
                    f'{np.array2string(np.asarray(affine), precision=4)}\nvs\n'
                    f'{np.array2string(np.asarray(ref_affine), precision=4)}')


def slicing_axis(spacings: Iterable[Sequence[float]]) -> int:
  """The out-of-plane axis of nnU-Net's 2d configuration.

  The array axis with the largest median spacing over the dataset: slices
  are then the high-resolution planes. Ties go to the last axis, the usual
  slice axis of a NIfTI volume (isotropic data has no preferred plane).
  """
  median = np.median(np.asarray(list(spacings), dtype=np.float64), axis=0)
  if median.shape != (3,):
    raise ValueError(f'expected 3 spacings per case, got {median.shape}')
  largest = np.flatnonzero(np.isclose(median, median.max(), rtol=1e-6))
  return int(largest[-1])


@dataclasses.dataclass
class ForegroundIntensities:
  """Per channel, the foreground voxels of every training case (CT stats)."""

  num_channels: int
  voxels: list[list[np.ndarray]] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    if not self.voxels:
      self.voxels = [[] for _ in range(self.num_channels)]

  def add(self, volume: Volume) -> None:
    foreground = volume.label > 0
    for c in range(self.num_channels):
      self.voxels[c].append(volume.image[..., c][foreground].astype(np.float64))

  def statistics(self, channel: int) -> dict[str, float]:
    values = (np.concatenate(self.voxels[channel]) if self.voxels[channel]
              else np.zeros(0))
    if values.size == 0:
      raise ValueError('no foreground voxels in the training labels: the CT '
                       'normalisation takes its statistics from them')
    upper, lower = np.percentile(values, (99.5, 0.5))
    return {'mean': float(values.mean()), 'std': float(values.std()),
            'percentile_00_5': float(lower), 'percentile_99_5': float(upper),
            'num_voxels': int(values.size)}


def normalization_plan(dataset: RawDataset,
                       foreground: ForegroundIntensities | None) -> list[dict[str, Any]]:
  """Per channel: its scheme and, for CT, the dataset statistics.

  Stored with the prepared dataset, so inference on new volumes applies the
  training statistics.
  """
  plan = []
  for c, (name, scheme) in enumerate(zip(dataset.channel_names, dataset.schemes)):
    entry: dict[str, Any] = {'channel': c, 'name': name, 'scheme': scheme}
    if scheme == CT:
      if foreground is None:
        raise ValueError('CT channels need the foreground statistics')
      entry.update(foreground.statistics(c))
    plan.append(entry)
  return plan


def normalize(image: np.ndarray, plan: Sequence[Mapping[str, Any]]) -> np.ndarray:
  """[..., C] float32 volume normalised channel by channel per `plan`."""
  out = np.empty(image.shape, dtype=np.float32)
  for entry in plan:
    c = entry['channel']
    x = image[..., c].astype(np.float64)
    if entry['scheme'] == CT:
      x = np.clip(x, entry['percentile_00_5'], entry['percentile_99_5'])
      x = (x - entry['mean']) / max(entry['std'], MIN_STD)
    else:
      x = (x - x.mean()) / max(x.std(), MIN_STD)
    out[..., c] = x
  return out


def slices(array: np.ndarray, axis: int) -> list[np.ndarray]:
  """The 2-D planes of a [X, Y, Z, ...] array across `axis`, in order."""
  return [np.take(array, i, axis=axis) for i in range(array.shape[axis])]
