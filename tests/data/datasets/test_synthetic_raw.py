"""synthetic_raw: a valid nnU-Net v2 raw folder on oblique anisotropic grids,
deterministic, and never seen half-written."""

import json
import os
import socket
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from lintunet_jax.data.datasets import synthetic_raw

NAME = synthetic_raw.DATASET_NAME
SHAPE = (16, 12, 5)
SPACING = (0.8, 0.8, 3.0)
SMALL = dict(num_train=3, num_test=2, shape=SHAPE, spacing=SPACING)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  return synthetic_raw.write(tmp_path_factory.mktemp('raw'), **SMALL)


def _cases(folder):
  """(images, label) paths of every case, training and test."""
  cases = []
  for images, labels in (('imagesTr', 'labelsTr'), ('imagesTs', 'labelsTs')):
    for label in sorted((folder / labels).iterdir()):
      case = label.name.removesuffix('.nii.gz')
      cases.append(([folder / images / f'{case}_000{c}.nii.gz'
                     for c in (0, 1)], label))
  return cases


def _arrays(folder):
  """Every file's stored array (not scaled), by path relative to folder."""
  return {str(p.relative_to(folder)): np.asanyarray(nib.load(p).dataobj)
          for p in sorted(folder.rglob('*.nii.gz'))}


def _spacing(affine):
  return np.linalg.norm(affine[:3, :3], axis=0)


def _dead_pid():
  child = subprocess.Popen([sys.executable, '-c', 'pass'])
  child.wait()
  return child.pid


def test_layout_and_dataset_json(dataset):
  assert dataset.name == NAME
  assert sorted(p.name for p in dataset.iterdir()) == [
      'dataset.json', 'imagesTr', 'imagesTs', 'labelsTr', 'labelsTs']
  names = lambda sub: sorted(p.name for p in (dataset / sub).iterdir())
  assert names('labelsTr') == [f'synth_00{i}.nii.gz' for i in range(3)]
  assert names('labelsTs') == ['synth_003.nii.gz', 'synth_004.nii.gz']
  assert names('imagesTr') == [f'synth_00{i}_000{c}.nii.gz'
                               for i in range(3) for c in (0, 1)]
  assert names('imagesTs') == [f'synth_00{i}_000{c}.nii.gz'
                               for i in (3, 4) for c in (0, 1)]
  meta = json.loads((dataset / 'dataset.json').read_text())
  assert meta['name'] == NAME and meta['description']
  assert meta['channel_names'] == {'0': 'CT', '1': 'T2'}
  assert meta['labels'] == {'background': 0, 'organ': 1, 'lesion': 2}
  assert meta['numTraining'] == 3
  assert meta['file_ending'] == '.nii.gz'
  assert meta['licence'] == 'synthetic'
  # Nothing but the dataset is left beside it.
  assert [p.name for p in dataset.parent.iterdir()] == [NAME]


def test_images_share_their_label_shape_affine_and_have_set_dtypes(dataset):
  cases = _cases(dataset)
  assert len(cases) == 5
  for (ct_path, mr_path), label_path in cases:
    label = nib.load(label_path)
    assert label.shape == SHAPE
    assert label.get_data_dtype() == np.uint8
    assert label.header.get_xyzt_units()[0] == 'mm'
    for path, dtype in ((ct_path, np.int16), (mr_path, np.float32)):
      image = nib.load(path)
      assert image.shape == SHAPE
      np.testing.assert_array_equal(image.affine, label.affine)
      assert image.get_data_dtype() == dtype
      assert np.asanyarray(image.dataobj).dtype == dtype


@pytest.mark.parametrize('shape,spacing', [
    (SHAPE, SPACING),
    ((5, 16, 12), (3.0, 0.8, 0.8)),  # the coarse axis first
    ((12, 5, 16), (0.7, 2.5, 0.9)),
])
def test_spacing_from_the_affine_is_the_requested_one(tmp_path, shape,
                                                      spacing):
  folder = synthetic_raw.write(tmp_path, num_train=2, num_test=1,
                               shape=shape, spacing=spacing, seed=3)
  for (ct_path, mr_path), label_path in _cases(folder):
    for path in (ct_path, mr_path, label_path):
      image = nib.load(path)
      assert image.shape == shape
      np.testing.assert_allclose(_spacing(image.affine), spacing, rtol=1e-5)
      # The header's voxel sizes (what SimpleITK reports) agree.
      np.testing.assert_allclose(image.header.get_zooms(), spacing,
                                 rtol=1e-6)
      # qform (ITK's choice) and sform (nibabel's) hold the same affine.
      np.testing.assert_allclose(image.get_qform(), image.get_sform(),
                                 atol=1e-5)
  # The organ is drawn in millimetres: its voxel extent along the coarse
  # axis is smaller than along a fine one of the same millimetre size.
  _, _, label, _ = synthetic_raw.generate_case(0, shape=(24, 24, 24),
                                               spacing=(1.0, 1.0, 3.0))
  organ = np.argwhere(label > 0)
  extent = organ.max(0) - organ.min(0) + 1
  assert extent[2] * 2 <= min(extent[0], extent[1])


def test_affine_is_oblique_and_differs_per_case(dataset):
  affines = [nib.load(label).affine for _, label in _cases(dataset)]
  for affine in affines:
    rotation = affine[:3, :3] / _spacing(affine)
    off_diagonal = rotation[~np.eye(3, dtype=bool)]
    assert np.abs(off_diagonal).min() > np.sin(np.deg2rad(0.5)) ** 2
    assert np.abs(off_diagonal).max() > np.sin(np.deg2rad(1.5))
    # Diagonal entries are not the spacing: a reader must take norms.
    assert not np.allclose(np.abs(np.diag(affine[:3, :3])), SPACING,
                           rtol=1e-4)
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-6)
    assert np.linalg.det(rotation) > 0
  assert len({a.tobytes() for a in affines}) == len(affines)


def test_intensities_look_like_ct_and_mr(dataset):
  for (ct_path, mr_path), label_path in _cases(dataset):
    ct = np.asanyarray(nib.load(ct_path).dataobj)
    mr = np.asanyarray(nib.load(mr_path).dataobj)
    label = np.asanyarray(nib.load(label_path).dataobj)
    assert -1024 <= ct.min() and ct.max() <= 3071
    assert ct.min() < -900  # air
    organ, lesion = ct[label == 1].mean(), ct[label == 2].mean()
    assert 40 < organ < 80 and 110 < lesion < 190
    assert lesion - organ > 50
    assert mr.min() > 0 and mr.std() > 0 and ct.std() > 0
    assert mr[label == 2].mean() < mr[label == 1].mean() - 200


def test_labels_hold_background_organ_and_lesion_exactly(dataset):
  for _, label_path in _cases(dataset):
    label = np.asanyarray(nib.load(label_path).dataobj)
    assert set(np.unique(label).tolist()) == {0, 1, 2}
    assert (label == 1).sum() > (label == 2).sum() > 0


def test_same_seed_gives_identical_arrays(tmp_path, dataset):
  again = synthetic_raw.write(tmp_path / 'again', **SMALL)
  other = synthetic_raw.write(tmp_path / 'other', **SMALL, seed=1)
  first, second, third = (_arrays(f) for f in (dataset, again, other))
  assert first.keys() == second.keys() == third.keys()
  for key, array in first.items():
    assert array.dtype == second[key].dtype
    assert array.tobytes() == second[key].tobytes(), key
    assert array.tobytes() != third[key].tobytes(), key
  for key in first:
    if key.startswith('labels'):
      path = lambda folder: folder / key
      np.testing.assert_array_equal(nib.load(path(dataset)).affine,
                                    nib.load(path(again)).affine)


def test_a_case_does_not_depend_on_the_number_of_cases(tmp_path):
  few = synthetic_raw.write(tmp_path / 'few', **{**SMALL, 'num_test': 0})
  case = 'labelsTr/synth_002.nii.gz'
  more = _arrays(synthetic_raw.write(tmp_path / 'more', **SMALL))
  assert _arrays(few)[case].tobytes() == more[case].tobytes()
  assert not list((few / 'labelsTs').iterdir())


def test_ensure_keeps_a_complete_dataset(tmp_path, monkeypatch):
  folder = synthetic_raw.ensure(tmp_path, **SMALL)
  stamps = {p: p.stat().st_mtime_ns for p in folder.rglob('*')}

  def generate_case(*args, **kwargs):
    raise AssertionError('a complete dataset was generated again')

  monkeypatch.setattr(synthetic_raw, 'generate_case', generate_case)
  # Other arguments do not matter once a dataset is there.
  assert synthetic_raw.ensure(tmp_path, num_train=5, seed=9) == folder
  assert synthetic_raw.ensure(tmp_path) == folder
  assert {p: p.stat().st_mtime_ns for p in folder.rglob('*')} == stamps
  with pytest.raises(FileExistsError):
    synthetic_raw.write(tmp_path, **SMALL)
  assert {p: p.stat().st_mtime_ns for p in folder.rglob('*')} == stamps


def test_ensure_removes_dead_writers_temporaries_only(tmp_path):
  folder = synthetic_raw.ensure(tmp_path, **SMALL)
  host = socket.gethostname()
  mark = f'.{NAME}.tmp-'
  dead = tmp_path / f'{mark}{_dead_pid()}@{host}.ab12cd34'
  bare = tmp_path / f'{mark}{_dead_pid()}'  # an older naming, this host
  old_elsewhere = tmp_path / f'{mark}1@other-host.0000'
  live = tmp_path / f'{mark}{os.getpid()}@{host}.ffff0000'
  recent_elsewhere = tmp_path / f'{mark}1@other-host.1111'
  unrelated = tmp_path / '.something.tmp-1'
  for path in (dead, bare, old_elsewhere, live, recent_elsewhere, unrelated):
    (path / 'imagesTr').mkdir(parents=True)
  os.utime(old_elsewhere, (0, 0))
  assert synthetic_raw.ensure(tmp_path) == folder
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      [NAME, live.name, recent_elsewhere.name, unrelated.name])


def test_a_folder_without_dataset_json_is_rewritten(tmp_path):
  """What a writer that wrote in place and was killed would leave."""
  partial = tmp_path / NAME
  (partial / 'imagesTr').mkdir(parents=True)
  (partial / 'imagesTr' / 'synth_000_0000.nii.gz').write_bytes(b'cut')
  (partial / 'leftover.txt').write_text('x')
  folder = synthetic_raw.ensure(tmp_path, **SMALL)
  assert folder == partial
  assert (folder / 'dataset.json').is_file()
  assert not (folder / 'leftover.txt').exists()
  assert len(_cases(folder)) == 5
  nib.load(folder / 'imagesTr' / 'synth_000_0000.nii.gz').get_fdata()
  assert sorted(p.name for p in tmp_path.iterdir()) == [NAME]


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
  saved = []

  def save_then_fail(image, path):
    if len(saved) == 4:
      raise OSError('disk full')
    saved.append(path)
    nib.save(image, path)

  monkeypatch.setattr(synthetic_raw.nib, 'save', save_then_fail)
  with pytest.raises(OSError, match='disk full'):
    synthetic_raw.ensure(tmp_path, **SMALL)
  assert list(tmp_path.iterdir()) == []
  monkeypatch.undo()
  assert (synthetic_raw.ensure(tmp_path, **SMALL) / 'dataset.json').is_file()


def test_losing_a_race_returns_the_winners_dataset(tmp_path, monkeypatch):
  """Another process publishes while this one generates: the rename fails,
  this one's copy is discarded and the winner's is returned untouched."""
  winner = synthetic_raw.write(tmp_path, **SMALL)
  stamps = {p: p.stat().st_mtime_ns for p in winner.rglob('*')}
  real = synthetic_raw._is_complete
  misses = iter([False, False])  # ensure's and write's first checks

  def is_complete(folder):
    missed = next(misses, None)
    return real(folder) if missed is None else missed

  monkeypatch.setattr(synthetic_raw, '_is_complete', is_complete)
  assert synthetic_raw.ensure(tmp_path, **SMALL, seed=4) == winner
  assert {p: p.stat().st_mtime_ns for p in winner.rglob('*')} == stamps
  assert sorted(p.name for p in tmp_path.iterdir()) == [NAME]


def test_too_small_a_volume_is_refused(tmp_path):
  with pytest.raises(ValueError, match='too small'):
    synthetic_raw.write(tmp_path, shape=(2, 2, 1), num_train=1, num_test=0)
  with pytest.raises(ValueError, match='spacing'):
    synthetic_raw.write(tmp_path, spacing=(1.0, 0.0, 1.0))
  assert list(tmp_path.iterdir()) == []
