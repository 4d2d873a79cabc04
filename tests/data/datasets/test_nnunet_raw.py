"""nnunet_raw: NIfTI volumes of an nnU-Net v2 raw dataset, written here with
nibabel, prepared into 2-D slices; the stored intensities are checked
against nnU-Net's documented normalisation rule computed independently
(np.percentile, mean and std over the same foreground voxels), and the
stored geometry against the files'. Bad inputs stop with the file named,
leave nothing behind, and prepare once fixed."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from datasets_testlib import leftovers, prepare, read_split
from lintunet_jax.data.datasets import DataError
from lintunet_jax.data.datasets import nnunet_raw

SHAPE = (10, 9, 4)


def _rotation(degrees: float) -> np.ndarray:
  a = np.deg2rad(degrees)
  return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def _affine(spacing, degrees: float, origin=(-20.0, 13.0, 7.5)) -> np.ndarray:
  affine = np.eye(4)
  affine[:3, :3] = _rotation(degrees) @ np.diag(spacing)
  affine[:3, 3] = origin
  return affine


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
  image = nib.Nifti1Image(array, affine)
  image.header.set_xyzt_units('mm')
  nib.save(image, str(path))


def write_raw(root: Path, *, spacing=(0.7, 0.9, 2.5), shape=SHAPE, train=3, test=2,
              channel_names=('CT', 'T2'), seed=0) -> tuple[Path, dict]:
  """A raw dataset; returns its folder and the arrays written, by case."""
  rng = np.random.default_rng(seed)
  folder = root / 'Dataset123_Tiny'
  for sub in ('imagesTr', 'labelsTr', 'imagesTs', 'labelsTs'):
    (folder / sub).mkdir(parents=True, exist_ok=True)
  written = {}
  for i in range(train + test):
    case = f'case_{i:03d}'
    images_dir, labels_dir = (('imagesTr', 'labelsTr') if i < train
                              else ('imagesTs', 'labelsTs'))
    affine = _affine(spacing, degrees=5.0 + 3 * i)
    label = rng.integers(0, 3, shape).astype(np.uint8)
    label[0] = 0  # some background-only planes
    ct = rng.uniform(-1000, 2000, shape).astype(np.float32)
    ct[label == 1] = rng.normal(60, 30, int((label == 1).sum()))
    mr = rng.gamma(2.0, 150.0, shape).astype(np.float32)
    flair = rng.normal(500.0, 120.0, shape).astype(np.float32)
    channels = [ct, mr, flair][:len(channel_names)]
    for c, pixels in enumerate(channels):
      _save(folder / images_dir / f'{case}_{c:04d}.nii.gz', pixels, affine)
    _save(folder / labels_dir / f'{case}.nii.gz', label, affine)
    written[case] = dict(channels=channels, label=label, affine=affine,
                         split='train' if i < train else 'test')
  (folder / 'dataset.json').write_text(json.dumps({
      'name': 'Tiny', 'channel_names': {str(c): n for c, n in enumerate(channel_names)},
      'labels': {'background': 0, 'organ': 1, 'lesion': 2},
      'numTraining': train, 'file_ending': '.nii.gz'}))
  return folder, written


def _nnunet_ct(written: dict, channel: int):
  """nnU-Net's CTNormalization with its fingerprint taken over all voxels."""
  voxels = np.concatenate([
      case['channels'][channel][case['label'] > 0].astype(np.float64)
      for case in written.values() if case['split'] == 'train'])
  upper, lower = np.percentile(voxels, (99.5, 0.5))
  mean, std = voxels.mean(), voxels.std()
  return lambda x: (np.clip(x.astype(np.float64), lower, upper) - mean) / std


def _zscore(x):
  x = x.astype(np.float64)
  return (x - x.mean()) / x.std()


def _relative_error(got, want) -> float:
  return float(np.abs(got - want).max() / np.abs(want).max())


def test_round_trip_intensities_and_geometry(tmp_path):
  folder, written = write_raw(tmp_path / 'raw')
  builder = prepare('nnunet_raw', tmp_path / 'data', folder)
  assert builder.builder_config.channels == 2
  assert builder.builder_config.num_classes == 3
  meta = nnunet_raw.stored_volumes(builder)
  assert meta['slicing_axis'] == 2
  assert meta['cases'] == {'train': ['case_000', 'case_001', 'case_002'],
                           'test': ['case_003', 'case_004']}
  ct = _nnunet_ct(written, 0)
  ct_stats = meta['normalization'][0]
  assert ct_stats['scheme'] == 'ct' and meta['normalization'][1]['scheme'] == 'zscore'
  for split in ('train', 'test'):
    stored = read_split(builder, split)
    cases = {c: w for c, w in written.items() if w['split'] == split}
    assert len(stored) == len(cases) * SHAPE[2]
    for case, w in cases.items():
      want_ct, want_mr = ct(w['channels'][0]), _zscore(w['channels'][1])
      for z in range(SHAPE[2]):
        example = stored[f'{case}_slice{z:04d}']
        image = np.asarray(example['image'])
        assert image.dtype == np.float32 and image.shape == SHAPE[:2] + (2,)
        assert _relative_error(image[..., 0], want_ct[..., z]) < 1e-5
        assert _relative_error(image[..., 1], want_mr[..., z]) < 1e-5
        np.testing.assert_array_equal(example['mask'], w['label'][..., z])
        assert example['case_id'].decode() == case and example['slice_index'] == z
        np.testing.assert_allclose(example['affine'], w['affine'], atol=1e-6)
        np.testing.assert_allclose(example['spacing'], (0.7, 0.9, 2.5), rtol=1e-6)
  # The test split's CT uses the training statistics, not its own.
  assert ct_stats['num_voxels'] == sum(int((w['label'] > 0).sum())
                                       for w in written.values() if w['split'] == 'train')


@pytest.mark.parametrize('axis', [0, 1, 2])
def test_slices_across_the_axis_of_largest_spacing(tmp_path, axis):
  spacing = [0.8, 0.8, 0.8]
  spacing[axis] = 3.0
  folder, written = write_raw(tmp_path / 'raw', spacing=spacing, train=2, test=0,
                              channel_names=('T1',))
  builder = prepare('nnunet_raw', tmp_path / 'data', folder)
  assert nnunet_raw.stored_volumes(builder)['slicing_axis'] == axis
  stored = read_split(builder, 'train')
  assert len(stored) == 2 * SHAPE[axis]
  label = written['case_001']['label']
  for index in range(SHAPE[axis]):
    np.testing.assert_array_equal(stored[f'case_001_slice{index:04d}']['mask'],
                                  np.take(label, index, axis=axis))


def test_imagests_without_labels_is_not_a_split(tmp_path):
  folder, _ = write_raw(tmp_path / 'raw', train=2, test=1)
  for path in (folder / 'labelsTs').iterdir():
    path.unlink()
  (folder / 'labelsTs').rmdir()
  builder = prepare('nnunet_raw', tmp_path / 'data', folder)
  assert set(builder.info.splits) == {'train'}


# ------------------------------------------------------------- bad inputs


def _fails_then_prepares(tmp_path, folder, pattern, fix):
  data = tmp_path / 'data'
  with pytest.raises(DataError, match=pattern):
    prepare('nnunet_raw', data, folder)
  assert leftovers(data) == []
  fix()
  builder = prepare('nnunet_raw', data, folder)
  assert builder.info.splits['train'].num_examples > 0


def _replace(path: Path, array, affine=None):
  original = nib.load(str(path))
  data, old_affine = np.asarray(original.dataobj).copy(), original.affine.copy()
  _save(path, array(data) if callable(array) else array,
        old_affine if affine is None else affine)
  return lambda: _save(path, data, old_affine)


def test_a_4d_image_says_one_file_per_channel(tmp_path):
  folder, _ = write_raw(tmp_path / 'raw')
  path = folder / 'imagesTr' / 'case_001_0000.nii.gz'
  fix = _replace(path, lambda x: np.stack([x, x], axis=-1))
  _fails_then_prepares(tmp_path, folder,
                       r'case_001_0000\.nii\.gz: a 4-D image .* one 3-D file per channel', fix)


def test_nan_voxels(tmp_path):
  folder, _ = write_raw(tmp_path / 'raw')
  path = folder / 'imagesTr' / 'case_002_0001.nii.gz'

  def with_nan(x):
    x = x.copy()
    x[1, 2, 3], x[0, 0, 0] = np.nan, np.inf
    return x

  fix = _replace(path, with_nan)
  _fails_then_prepares(tmp_path, folder,
                       r'case_002_0001\.nii\.gz: 2 voxel\(s\) are NaN or infinite', fix)


def test_label_of_another_shape(tmp_path):
  folder, _ = write_raw(tmp_path / 'raw')
  path = folder / 'labelsTr' / 'case_000.nii.gz'
  fix = _replace(path, lambda x: x[:-1])
  _fails_then_prepares(tmp_path, folder,
                       r'labelsTr/case_000\.nii\.gz: shape \(9, 9, 4\) differs', fix)


def test_label_with_another_affine(tmp_path):
  folder, written = write_raw(tmp_path / 'raw')
  path = folder / 'labelsTr' / 'case_000.nii.gz'
  shifted = written['case_000']['affine'].copy()
  shifted[0, 3] += 5.0
  fix = _replace(path, lambda x: x, affine=shifted)
  _fails_then_prepares(tmp_path, folder,
                       r'labelsTr/case_000\.nii\.gz: affine differs', fix)


def test_missing_channel_file(tmp_path):
  folder, _ = write_raw(tmp_path / 'raw')
  path = folder / 'imagesTr' / 'case_001_0001.nii.gz'
  content = path.read_bytes()
  path.unlink()
  _fails_then_prepares(tmp_path, folder,
                       r'case_001_0001\.nii\.gz: missing: dataset\.json declares 2 channels',
                       lambda: path.write_bytes(content))


def test_undeclared_label_values(tmp_path):
  folder, _ = write_raw(tmp_path / 'raw')
  path = folder / 'labelsTs' / 'case_004.nii.gz'

  def with_five(x):
    x = x.copy()
    x[2, 2, 2] = 5
    return x

  fix = _replace(path, with_five)
  _fails_then_prepares(tmp_path, folder,
                       r'labelsTs/case_004\.nii\.gz: label value\(s\) 5 are not declared', fix)


@pytest.mark.parametrize('key', ['channel_names', 'labels'])
def test_dataset_json_without_a_required_key(tmp_path, key):
  folder, _ = write_raw(tmp_path / 'raw')
  path = folder / 'dataset.json'
  good = path.read_text()
  meta = json.loads(good)
  del meta[key]
  path.write_text(json.dumps(meta))
  _fails_then_prepares(tmp_path, folder, rf"dataset\.json: has no '{key}'",
                       lambda: path.write_text(good))


def test_a_bucket_raw_dataset_is_refused_with_the_reason(tmp_path):
  with pytest.raises(ValueError, match=r'reads local files only'):
    prepare('nnunet_raw', tmp_path / 'data', 'gs://bucket/Dataset123_Tiny')


def test_without_manual_dir_the_synthetic_raw_dataset_is_written_then_reused(tmp_path):
  data = tmp_path / 'data'
  builder = prepare('nnunet_raw', data, None)
  folder = data / 'downloads' / 'manual' / 'nnunet_raw' / 'Dataset990_SyntheticCTMR'
  assert (folder / 'dataset.json').is_file()
  assert builder.builder_config.folder == str(folder.resolve())
  assert (builder.builder_config.channels, builder.builder_config.num_classes) == (2, 3)
  meta = nnunet_raw.stored_volumes(builder)
  assert meta['slicing_axis'] == 2  # 0.8 x 0.8 x 3 mm
  assert [entry['scheme'] for entry in meta['normalization']] == ['ct', 'zscore']
  assert set(builder.info.splits) == {'train', 'test'}
  stamp = (folder / 'dataset.json').stat().st_mtime_ns
  again = prepare('nnunet_raw', data, None)  # the same files, not rewritten
  assert (folder / 'dataset.json').stat().st_mtime_ns == stamp
  assert again.info.splits['train'].num_examples == builder.info.splits['train'].num_examples
