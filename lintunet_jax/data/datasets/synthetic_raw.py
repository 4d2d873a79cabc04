"""A small nnU-Net v2 raw dataset of NIfTI volumes, generated on first use.

The embedded default for the volume path, so it trains and tests with no
download (nothing is committed: `ensure` writes it the first time). It is
a real nnU-Net v2 raw folder, so the same code reads it and a downloaded
Medical Segmentation Decathlon task:

  root/Dataset990_SyntheticCTMR/
    dataset.json
    imagesTr/synth_000_0000.nii.gz   channel 0, CT: int16 Hounsfield units,
                                     stored as int16 like real CT scans
    imagesTr/synth_000_0001.nii.gz   channel 1, T2-like MR: float32, positive
    labelsTr/synth_000.nii.gz        uint8: 0 background, 1 organ, 2 lesion
    imagesTs/, labelsTs/             the test cases, numbered on after the
                                     training cases (synth_008, ...)

What real data has and a toy would not, so the loaders are tested on it:
  * anisotropic voxels (0.8 x 0.8 x 3 mm by default; `spacing` may put the
    coarse axis anywhere), with the shapes drawn in millimetres, so they
    are round in the world and squashed in the voxel grid;
  * an oblique affine per case (a rotation of 2 to 6 degrees about each
    axis, times diag(spacing), plus an origin), so code that takes the
    diagonal of the affine for the spacing gets it wrong; the spacing is
    the column norms of affine[:3, :3];
  * two modalities of different range and contrast: CT in Hounsfield units
    (lesion brighter than organ) and MR with a bias field (lesion darker).
Every case holds both foreground classes. Each case is generated from
(seed, case number) alone, so the same seed gives the same arrays, and a
case does not change with num_train or num_test.

Writing is atomic: everything goes into a temporary sibling folder,
dataset.json last, and the folder is renamed into place, so a dataset
folder with dataset.json is complete and a killed writer leaves only a
temporary folder, which a later `ensure` removes.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import socket
import time
import uuid

import nibabel as nib
import numpy as np

DATASET_NAME = 'Dataset990_SyntheticCTMR'
CHANNEL_NAMES = {'0': 'CT', '1': 'T2'}
LABELS = {'background': 0, 'organ': 1, 'lesion': 2}
FILE_ENDING = '.nii.gz'

_TEMP_MARK = f'.{DATASET_NAME}.tmp-'
# A temporary folder whose writer cannot be checked (another host, or a
# name we did not make) counts as abandoned after this long; generating
# the default dataset takes about a second.
_STALE_AFTER_S = 3600.0
_MAX_DRAWS = 100  # geometry redraws before a shape is declared too small
_HU_RANGE = (-1024, 3071)  # what a 12-bit CT scanner stores


def write(root: str | os.PathLike, *, num_train: int = 8, num_test: int = 3,
          shape: tuple[int, int, int] = (48, 40, 14),
          spacing: tuple[float, float, float] = (0.8, 0.8, 3.0),
          seed: int = 0) -> pathlib.Path:
  """Generates the dataset as root/DATASET_NAME and returns that folder.

  Raises FileExistsError if a complete dataset is already there: writing
  over it could pull files from under a reader, and silently keeping it
  could hand back other parameters than asked for. `ensure` is the call
  that accepts an existing dataset. A folder there without dataset.json
  was not written by this module (it never writes in place) and is
  replaced.
  """
  shape = tuple(int(n) for n in shape)
  spacing = tuple(float(s) for s in spacing)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f'shape must be 3 positive sizes, got {shape}')
  if len(spacing) != 3 or not all(math.isfinite(s) and s > 0
                                  for s in spacing):
    raise ValueError(f'spacing must be 3 positive millimetre sizes, got '
                     f'{spacing}')
  if num_train < 1 or num_test < 0:
    raise ValueError(f'need num_train >= 1 and num_test >= 0, got '
                     f'{num_train} and {num_test}')
  root = pathlib.Path(root)
  final = root / DATASET_NAME
  if _is_complete(final):
    raise FileExistsError(f'{final} already holds a complete dataset')
  root.mkdir(parents=True, exist_ok=True)
  temp = root / f'{_TEMP_MARK}{_owner()}.{uuid.uuid4().hex[:8]}'
  os.mkdir(temp)  # not mkdtemp: its 0o700 would carry over to the dataset
  try:
    _write_into(temp, num_train=num_train, num_test=num_test, shape=shape,
                spacing=spacing, seed=seed)
    _publish(temp, final)
  finally:
    shutil.rmtree(temp, ignore_errors=True)  # gone already after a rename
  return final


def ensure(root: str | os.PathLike, **kwargs) -> pathlib.Path:
  """root/DATASET_NAME, written with `write(root, **kwargs)` if incomplete.

  Safe to call from every process at once: each writes its own temporary
  folder, the first rename wins and the others discard theirs. An
  existing complete dataset is returned as it is, whatever kwargs say.
  """
  root = pathlib.Path(root)
  final = root / DATASET_NAME
  remove_stale_temporaries(root)
  if _is_complete(final):
    return final
  try:
    return write(root, **kwargs)
  except FileExistsError:
    if _is_complete(final):  # another process finished first
      return final
    raise


def remove_stale_temporaries(root: str | os.PathLike) -> list[pathlib.Path]:
  """Deletes temporary folders of writers that died; returns what it deleted.

  A writer still running keeps its folder: deleting it would make that
  writer's rename fail.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    return []
  removed = []
  for entry in sorted(root.iterdir()):
    if entry.name.startswith(_TEMP_MARK) and _is_stale(entry):
      shutil.rmtree(entry, ignore_errors=True)
      removed.append(entry)
  return removed


def case_ids(num_train: int = 8, num_test: int = 3) -> tuple[list[str],
                                                              list[str]]:
  """(training ids, test ids): the test numbering continues the training."""
  ids = [f'synth_{i:03d}' for i in range(num_train + num_test)]
  return ids[:num_train], ids[num_train:]


def generate_case(index: int, *, shape=(48, 40, 14), spacing=(0.8, 0.8, 3.0),
                  seed: int = 0):
  """(ct int16, mr float32, label uint8, affine float64 4x4) of one case.

  Drawn from (seed, index) alone, so each case is reproducible by itself.
  """
  shape = tuple(int(n) for n in shape)
  spacing = np.asarray(spacing, np.float64)
  rng = np.random.default_rng([seed, index])
  affine = _oblique_affine(rng, shape, spacing)
  # Millimetre coordinates along each axis, broadcastable to `shape`: the
  # shapes are drawn in these, so they are not squashed by the spacing.
  coords = [np.arange(n, dtype=np.float64).reshape(
      [-1 if a == axis else 1 for a in range(3)]) * spacing[axis]
            for axis, n in enumerate(shape)]
  extent = np.asarray(shape) * spacing
  for _ in range(_MAX_DRAWS):
    body, organ, lesion = _anatomy(rng, coords, shape, spacing, extent)
    label = np.zeros(shape, np.uint8)
    label[organ] = LABELS['organ']
    label[lesion] = LABELS['lesion']
    if (label == LABELS['organ']).any() and (label == LABELS['lesion']).any():
      break
  else:
    raise ValueError(f'shape {shape} at spacing {tuple(spacing)} mm is too '
                     'small to hold an organ with a lesion inside it')
  body |= organ
  ct = _ct(rng, coords, shape, body, organ, lesion)
  mr = _mr(rng, coords, shape, extent, body, organ, lesion)
  assert set(np.unique(label)) == set(LABELS.values()), index
  assert np.ptp(ct) > 0 and np.ptp(mr) > 0, index
  return ct, mr, label, affine


def _write_into(folder: pathlib.Path, *, num_train, num_test, shape, spacing,
                seed) -> None:
  train, test = case_ids(num_train, num_test)
  for images, labels, ids in (('imagesTr', 'labelsTr', train),
                              ('imagesTs', 'labelsTs', test)):
    (folder / images).mkdir()
    (folder / labels).mkdir()
    for case in ids:
      ct, mr, label, affine = generate_case(
          int(case.rsplit('_', 1)[1]), shape=shape, spacing=spacing,
          seed=seed)
      _save(ct, affine, folder / images / f'{case}_0000{FILE_ENDING}')
      _save(mr, affine, folder / images / f'{case}_0001{FILE_ENDING}')
      _save(label, affine, folder / labels / f'{case}{FILE_ENDING}')
  description = {
      'name': DATASET_NAME,
      'description': ('Synthetic CT + T2-like MR volumes with an organ and '
                      'a lesion inside it, on oblique anisotropic grids; '
                      'generated by lintunet_jax.data.datasets.'
                      'synthetic_raw.'),
      'reference': 'none (generated)',
      'licence': 'synthetic',
      'release': '1.0',
      'channel_names': CHANNEL_NAMES,
      'labels': LABELS,
      'numTraining': num_train,
      'numTest': num_test,
      'file_ending': FILE_ENDING,
      # Not read by nnU-Net; says how to regenerate exactly this.
      'synthetic_parameters': {'shape': list(shape),
                               'spacing': list(spacing), 'seed': seed},
  }
  # Last: its presence is what marks the folder complete.
  (folder / 'dataset.json').write_text(json.dumps(description, indent=2)
                                       + '\n')


def _publish(temp: pathlib.Path, final: pathlib.Path) -> None:
  """Renames temp to final; FileExistsError if a complete final got there."""
  try:
    os.replace(temp, final)
    return
  except OSError:
    if not os.path.lexists(final):
      raise
  if _is_complete(final):
    raise FileExistsError(f'{final} was completed by another writer')
  # A folder without dataset.json is in the way. Moved aside rather than
  # deleted in place: if another writer completes it between the check
  # above and the move, its dataset is put back, not destroyed.
  aside = final.with_name(f'{_TEMP_MARK}{_owner()}.{uuid.uuid4().hex[:8]}')
  try:
    os.replace(final, aside)
  except FileNotFoundError:
    pass  # another writer moved it first
  else:
    if _is_complete(aside):
      try:
        os.replace(aside, final)
      except OSError:
        shutil.rmtree(aside, ignore_errors=True)
      raise FileExistsError(f'{final} was completed by another writer')
    shutil.rmtree(aside, ignore_errors=True)
  try:
    os.replace(temp, final)
  except OSError:
    if _is_complete(final):
      raise FileExistsError(
          f'{final} was completed by another writer') from None
    raise


def _is_complete(folder: pathlib.Path) -> bool:
  return (folder / 'dataset.json').is_file()


def _owner() -> str:
  """'<pid>@<host>': who writes a temporary folder, for `_is_stale`."""
  return f'{os.getpid()}@{socket.gethostname()}'


def _is_stale(folder: pathlib.Path) -> bool:
  """Whether the writer of a temporary folder is gone.

  Names are '<mark><pid>@<host>.<random>'; a bare '<mark><pid>' counts as
  this host's. Only a pid on this host can be checked (a shared disk may
  hold other hosts' folders), so otherwise the folder's age decides.
  """
  owner = folder.name[len(_TEMP_MARK):]
  pid, _, host = owner.partition('@')
  host = host.rsplit('.', 1)[0] if host else socket.gethostname()
  if pid.isdigit() and host == socket.gethostname() and os.name == 'posix':
    return not _pid_alive(int(pid))
  try:
    age = time.time() - folder.stat().st_mtime
  except FileNotFoundError:
    return False
  return age > _STALE_AFTER_S


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)  # signal 0: only checks that the process exists
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's process
  return True


def _oblique_affine(rng: np.random.Generator, shape, spacing: np.ndarray):
  """A rotation of 2..6 degrees about each axis, scaled by the spacing.

  Every angle is at least 2 degrees, so no off-diagonal entry is zero and
  `diag(affine)` is never the spacing.
  """
  angles = np.deg2rad(rng.uniform(2.0, 6.0, 3) * rng.choice([-1.0, 1.0], 3))
  rotation = np.eye(3)
  for axis, angle in enumerate(angles):
    c, s = math.cos(angle), math.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    turn = np.eye(3)
    turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
    rotation = turn @ rotation
  affine = np.eye(4)
  affine[:3, :3] = rotation * spacing  # scales column k by spacing[k]
  # The volume's centre lands near the world origin, as scanners place it.
  centre = (np.asarray(shape) - 1) / 2.0 * spacing
  affine[:3, 3] = -(rotation @ centre) + rng.uniform(-30.0, 30.0, 3)
  return affine


def _ellipsoid(coords, centre, radii) -> np.ndarray:
  return sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii)) <= 1


def _anatomy(rng, coords, shape, spacing, extent):
  """Boolean body, organ and lesion masks; organ and lesion in millimetres.

  The body is an elliptic cylinder along the coarsest axis (the slice
  axis of a scan); the organ an ellipsoid inside it; the lesion a smaller
  ellipsoid whose centre sits on a voxel centre inside the organ, so it
  never falls between slices.
  """
  slice_axis = int(np.argmax(spacing))
  centre = (np.asarray(shape) - 1) / 2.0 * spacing
  in_plane = [a for a in range(3) if a != slice_axis]
  body_centre = centre + rng.uniform(-0.03, 0.03, 3) * extent
  body_radii = rng.uniform(0.40, 0.48, 3) * extent
  body = _ellipsoid([coords[a] for a in in_plane], body_centre[in_plane],
                    body_radii[in_plane])
  body = np.broadcast_to(body, shape).copy()

  organ_radii = rng.uniform(0.18, 0.28, 3) * extent.min()
  organ_centre = centre + rng.uniform(-0.1, 0.1, 3) * extent
  organ = _ellipsoid(coords, organ_centre, organ_radii)

  scale = rng.uniform(0.3, 0.5, 3)
  # An offset of at most 1 - max(scale) organ radii keeps the lesion in.
  direction = rng.normal(size=3)
  direction /= np.linalg.norm(direction) + 1e-12
  reach = rng.uniform(0.0, 0.8) * (1.0 - scale.max())
  wanted = organ_centre + direction * reach * organ_radii
  index = np.clip(np.round(wanted / spacing), 0, np.asarray(shape) - 1)
  lesion = _ellipsoid(coords, index * spacing, scale * organ_radii) & organ
  return body, organ, lesion


def _smooth_field(rng, coords, shape, wavelength_mm: float,
                  terms: int = 4) -> np.ndarray:
  """Smooth random texture of unit spread: a few plane waves in mm."""
  field = np.zeros(shape)
  for _ in range(terms):
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-12
    k = 2 * math.pi / (wavelength_mm * rng.uniform(0.7, 1.3))
    phase = sum(c * d for c, d in zip(coords, direction)) * k
    field += np.cos(phase + rng.uniform(0, 2 * math.pi))
  return field / math.sqrt(terms / 2)


def _ct(rng, coords, shape, body, organ, lesion) -> np.ndarray:
  """Hounsfield units: air, soft tissue 0..60, organ ~60, lesion ~150."""
  tissue = rng.uniform(15.0, 35.0) + 10.0 * _smooth_field(rng, coords, shape,
                                                          25.0)
  ct = np.where(body, tissue, -1000.0)
  ct = np.where(organ, rng.uniform(55.0, 70.0)
                + 4.0 * _smooth_field(rng, coords, shape, 10.0), ct)
  ct = np.where(lesion, rng.uniform(135.0, 165.0), ct)
  ct = ct + rng.normal(0.0, rng.uniform(15.0, 25.0), shape)
  return np.clip(np.round(ct), *_HU_RANGE).astype(np.int16)


def _mr(rng, coords, shape, extent, body, organ, lesion) -> np.ndarray:
  """T2-like: organ bright, lesion darker, a bias field and Rician noise."""
  mr = np.where(body, rng.uniform(400.0, 550.0)
                + 40.0 * _smooth_field(rng, coords, shape, 20.0), 60.0)
  mr = np.where(organ, rng.uniform(800.0, 950.0), mr)
  mr = np.where(lesion, rng.uniform(300.0, 420.0), mr)
  # The coil's sensitivity: a smooth gain of about 0.75..1.3 over the FOV.
  tilt = rng.uniform(-0.25, 0.25, 3)
  bias = np.exp(sum(t * (c / e - 0.5) for t, c, e in zip(tilt, coords, extent)))
  mr = mr * bias
  sigma = rng.uniform(15.0, 30.0)
  # Magnitude of complex Gaussian noise (Rician), as MR scanners store.
  mr = np.hypot(mr + rng.normal(0.0, sigma, shape),
                rng.normal(0.0, sigma, shape))
  return np.maximum(mr, 1.0).astype(np.float32)


def _save(array: np.ndarray, affine: np.ndarray, path: pathlib.Path) -> None:
  image = nib.Nifti1Image(array, affine)
  image.header.set_xyzt_units('mm')
  # Both forms with a real code: ITK (nnU-Net's SimpleITK reader) reads the
  # qform, nibabel the sform, and each then finds the same rotation.
  image.set_qform(affine, code=1)
  image.set_sform(affine, code=1)
  nib.save(image, path)
