"""Choosing the builder for a config and preparing it safely, once.

Why the ceremony around `download_and_prepare`:
  * idempotent: a prepared dataset is reused, never rebuilt;
  * nothing half-written: TFDS writes into `incomplete.*` and renames at the
    end (deleting it on an exception). A killed run can still leave such a
    directory; we delete those under a lock, so a re-run just works;
  * one writer at a time: several processes (hosts sharing a disk, parallel
    tests) serialise on a lock file, and the later ones reuse the result;
  * provenance: a builder's data directory does not encode its manual_dir,
    so preparing from folder B into a data_dir that holds folder A's
    dataset would silently reuse A. We record the source and refuse;
  * gs:// data_dirs: the array_record writer writes local files only (its
    reader does read gs://), and a bucket has neither locks nor atomic
    renames. So the dataset is prepared in a local temporary folder and
    uploaded, its `dataset_info.json` last: a dataset counts as prepared on
    the bucket only once that file exists, and a partial upload left by a
    kill is deleted and redone. The lock is then a local file named after
    the URL: it serialises the processes of one host; on a pod, only
    process 0 should prepare (docs/training.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import psutil
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle

from lintunet_jax import paths
from lintunet_jax.data.datasets import base
from lintunet_jax.data.datasets import brain_tumor_coco  # noqa: F401  (registers)
from lintunet_jax.data.datasets import nnunet_raw
from lintunet_jax.data.datasets import segmentation_folder
from lintunet_jax.data.datasets import synthetic_raw
from lintunet_jax.data.datasets import synthetic_mri  # noqa: F401  (registers)
from lintunet_jax.data.datasets.report import PreparationReport

# Our builders: name -> function(channels, num_classes) -> builder config
# (nnunet_raw's config comes from its dataset.json: `raw_dataset_folder`).
OURS = {
    'nnunet_raw': None,
    'brain_tumor_coco': lambda channels, num_classes: (
        'gray' if channels == 1 else 'rgb'),
    'segmentation_folder': segmentation_folder.config_for,
    'synthetic_mri': lambda channels, num_classes: 'default',
}
NEEDS_MANUAL_DIR = ('brain_tumor_coco', 'segmentation_folder')
DEFAULT_DATA_DIR = '~/tensorflow_datasets'


def data_dir(dataset_config) -> str:
  """The data_dir: local (with ~ expanded) or a gs:// URL (checked)."""
  value = dataset_config.data_dir or DEFAULT_DATA_DIR
  if paths.is_url(value):
    if paths.scheme(value) != 'gs':
      raise paths.UnsupportedPathError(
          f'config.dataset.data_dir {value!r}: datasets are read with '
          'array_record, which reads local files and gs:// only')
    paths.check(value, 'config.dataset.data_dir')
    return value
  return os.path.expanduser(value)


def base_name(name: str) -> str:
  """'synthetic_mri/small:1.0.0' -> 'synthetic_mri'."""
  return name.split('/')[0].split(':')[0]


def is_ours(name: str) -> bool:
  return base_name(name) in OURS


class _QuietCustomConfigs(logging.Filter):
  """TFDS warns "Using custom data configuration" each time a builder is
  made from a config object; nnunet_raw's config is one by design (made
  from dataset.json), and the warning repeated on every read says nothing."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith('Using custom data configuration: NnunetRawConfig')


logging.getLogger('absl').addFilter(_QuietCustomConfigs())


def make_builder(dataset_config, num_classes: int):
  """The TFDS builder for `config.dataset` (no preparation)."""
  name = dataset_config.name
  kwargs = {'data_dir': data_dir(dataset_config)}
  if base_name(name) == 'nnunet_raw' and '/' not in name:
    kwargs['config'] = nnunet_raw.config_for(raw_dataset_folder(dataset_config))
  elif is_ours(name) and '/' not in name:
    # Stored channels follow the model's, so a 1-channel model never pays
    # for RGB storage; class handling follows num_classes.
    config = OURS[base_name(name)](dataset_config.channels, num_classes)
    if not isinstance(config, str) and \
        config.name in tfds.builder_cls(base_name(name)).builder_configs:
      # By name: a pickled copy of a declared config (grain workers rebuild
      # the builder) would be refused by TFDS as a clashing custom config.
      config = config.name
    kwargs['config'] = config
  return tfds.builder(name, **kwargs)


def raw_dataset_folder(dataset_config) -> str:
  """nnunet_raw's source: manual_dir, or the synthetic raw dataset.

  The synthetic one (the volume path's embedded default) is written on
  first use beside the prepared data (under ~/tensorflow_datasets when the
  data_dir is a bucket: nibabel reads local files only), so later commands
  read the same files.
  """
  if dataset_config.manual_dir:
    return dataset_config.manual_dir
  root = data_dir(dataset_config)
  if paths.is_url(root):
    root = os.path.expanduser(DEFAULT_DATA_DIR)
  return str(synthetic_raw.ensure(Path(root) / 'downloads' / 'manual' / 'nnunet_raw'))


def prepare(builder, manual_dir: str | None) -> PreparationReport | None:
  """Prepares `builder` as array_record unless already done; the report."""
  if builder.name == 'nnunet_raw':  # its config knows its (checked) folder
    manual_dir = builder.builder_config.folder
  if builder.name in NEEDS_MANUAL_DIR:
    if not manual_dir:
      raise ValueError(
          f'{builder.name} reads your files: set config.dataset.manual_dir '
          'to the folder holding them (see docs/data.md)')
    manual_dir = str(Path(manual_dir).expanduser().resolve())
    if not Path(manual_dir).is_dir():
      raise FileNotFoundError(f'{manual_dir}: config.dataset.manual_dir does '
                              'not exist or is not a folder')
  if paths.is_url(builder.data_dir):
    data_path = builder.data_path
    with _lock(_url_lock_folder(os.fspath(data_path))):
      if not (data_path / _INFO_FILE).exists():
        _prepare_and_upload(builder, manual_dir)
  else:
    data_path = Path(builder.data_path)
    with _lock(data_path.parent.parent):
      if not data_path.exists():
        _remove_stale_incomplete(data_path)
        _prepare_unlocked(builder, manual_dir)
  report = base.load_report(builder)
  if report is not None and manual_dir and report.source != manual_dir:
    raise ValueError(
        f'{data_path} already holds {builder.name} prepared from '
        f'{report.source}, not from config.dataset.manual_dir={manual_dir}. '
        'Use another config.dataset.data_dir (one per source), or delete '
        f'{data_path} to prepare again.')
  return report


_INFO_FILE = 'dataset_info.json'  # TFDS's; written last by our uploads


def _url_lock_folder(url: str) -> Path:
  digest = hashlib.sha1(url.encode()).hexdigest()[:16]
  return Path(tempfile.gettempdir()) / f'lintunet-prepare-{digest}'


def _prepare_and_upload(builder, manual_dir) -> None:
  """Prepares `builder` locally, then copies it to its gs:// data_path."""
  remote = builder.data_path
  if remote.exists():  # a partial upload of a killed run (no info file)
    remote.rmtree()
  with tempfile.TemporaryDirectory(prefix='lintunet-prepare-') as local_dir:
    state = dict(builder._original_state, data_dir=local_dir)  # pylint: disable=protected-access
    local = type(builder)(**state)
    _prepare_unlocked(local, manual_dir)
    local_path = Path(local.data_path)  # our temporary folder: plain files
    files = sorted(p for p in local_path.rglob('*') if p.is_file())
    files.sort(key=lambda p: p.name == _INFO_FILE)  # the completion mark last
    for path in files:
      target = remote / path.relative_to(local_path).as_posix()
      target.parent.mkdir(parents=True, exist_ok=True)
      with open(path, 'rb') as src, target.open('wb') as dst:  # streamed
        shutil.copyfileobj(src, dst, 16 << 20)
  builder.info.read_from_directory(remote)  # splits, sizes, metadata


def _prepare_unlocked(builder, manual_dir):
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  if not is_ours(builder.name) and not _has_tensorflow():
    raise RuntimeError(
        f'{builder.name} is a TFDS catalogue dataset and is not prepared in '
        f'{builder.data_dir}. Preparing catalogue datasets needs TensorFlow: '
        'pip install tensorflow (see docs/data.md); '
        'reading them afterwards does not.')
  with _in_memory_shuffle_without_tensorflow():
    builder.download_and_prepare(file_format='array_record',
                                 download_config=download_config)


@contextlib.contextmanager
def _in_memory_shuffle_without_tensorflow():
  """Keeps TFDS's write-time shuffle in memory when TensorFlow is absent.

  TFDS spills a split to temporary files through `tf.io.gfile` once it
  passes 1 GiB, which fails without TensorFlow. Allowing half of the free
  memory instead covers realistic medical datasets (the seed's largest
  split is ~0.6 GiB); a larger one fails with a message saying why.
  """
  if _has_tensorflow():
    yield
    return
  original = tfds_shuffle.MAX_MEM_BUFFER_SIZE
  allowed = max(original, psutil.virtual_memory().available // 2)
  tfds_shuffle.MAX_MEM_BUFFER_SIZE = allowed
  try:
    yield
  except ModuleNotFoundError as e:
    if e.name != 'tensorflow':
      raise
    raise MemoryError(
        f'a split is larger than {allowed / 2**30:.1f} GiB in memory, so '
        'TFDS needs TensorFlow to shuffle it on disk: install '
        'tensorflow, or split the data into smaller splits') from None
  finally:
    tfds_shuffle.MAX_MEM_BUFFER_SIZE = original


def _has_tensorflow() -> bool:
  return importlib.util.find_spec('tensorflow') is not None


@contextlib.contextmanager
def _lock(folder: Path):
  folder.mkdir(parents=True, exist_ok=True)
  with open(folder / '.prepare.lock', 'w') as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_incomplete(data_path: Path) -> None:
  """Deletes `incomplete.*` leftovers of a killed run (we hold the lock)."""
  parent = data_path.parent
  if not parent.exists():
    return
  for leftover in parent.glob(f'incomplete.*_{data_path.name}'):
    shutil.rmtree(leftover, ignore_errors=True)
