"""What every builder of ours stores, and the bookkeeping they share.

Storage: `image` uint8 [H, W, C], `mask` uint8 [H, W] of class ids and the
source `file_name`, at native resolution (the pipeline resizes, so changing
`image_size` never needs a new preparation). Tensors use `encoding='bytes'`
rather than `tfds.features.Image`, whose encoder needs TensorFlow; the
array_record writer compresses each record itself, which on the seed's
images costs several times less than TFDS's own zlib encoding for a
similar size. Masks do use zlib (see below).
"""

from __future__ import annotations

import abc
import inspect
import time
from typing import Any

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from lintunet_jax.data.datasets import report as report_lib
from lintunet_jax.data.datasets import transforms

# Key under `info.metadata` holding the PreparationReport.
REPORT_KEY = 'preparation_report'


def segmentation_features(channels: int) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(
          shape=(None, None, channels), dtype=np.uint8, encoding='bytes'),
      # zlib: masks are mostly zeros, so this is ~1 ms and shrinks them
      # ~100x, which keeps TFDS's in-memory shuffle buffer small.
      'mask': tfds.features.Tensor(
          shape=(None, None), dtype=np.uint8, encoding='zlib'),
      'file_name': tfds.features.Text(),
  })


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder,
                          skip_registration=True):
  """A GeneratorBasedBuilder that keeps a PreparationReport while it runs."""

  DESCRIPTION = ''

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup needs the undeclared `importlib_resources` package
    # for builders defined in a regular package; the file path is the same.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.report: report_lib.PreparationReport | None = None

  @property
  def stored_channels(self) -> int:
    return getattr(self.builder_config, 'channels', 1)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=segmentation_features(self.stored_channels),
        metadata=tfds.core.MetadataDict(),
    )

  @abc.abstractmethod
  def _source_description(self, dl_manager) -> str:
    """Where the examples come from, recorded in the report."""

  def _download_and_prepare(self, dl_manager, download_config=None, **kwargs):
    self.report = report_lib.PreparationReport(
        dataset=f'{self.name}/{self.builder_config.name}',
        source=self._source_description(dl_manager))
    started = time.perf_counter()
    super()._download_and_prepare(
        dl_manager=dl_manager, download_config=download_config, **kwargs)
    self.report.seconds = time.perf_counter() - started
    # Written to metadata.json with the rest of DatasetInfo, inside TFDS's
    # temporary directory, so it only exists for a complete dataset.
    self.info.metadata[REPORT_KEY] = self.report.to_json()

  def stored_image(self, pixels: np.ndarray) -> np.ndarray:
    """Converts a decoded file to the stored channel count, counting losses."""
    if (self.stored_channels == 1 and pixels.ndim == 3
        and not transforms.channels_equal(pixels)):
      self.report.count('colour images stored as grayscale (luma)')
    return transforms.to_channels(pixels, self.stored_channels)

  def example(self, split: str, image: np.ndarray, mask: np.ndarray,
              file_name: str) -> dict[str, Any]:
    """Final checks and tallies shared by every builder."""
    if image.shape[:2] != mask.shape:
      raise report_lib.DataError(
          file_name, f'mask size {mask.shape[1]}x{mask.shape[0]} differs '
          f'from image size {image.shape[1]}x{image.shape[0]}')
    self.report.add_example(split, mask)
    return {'image': image, 'mask': mask.astype(np.uint8),
            'file_name': file_name}


def load_report(builder) -> report_lib.PreparationReport | None:
  """The report stored with a prepared dataset (None for catalogue ones)."""
  metadata = builder.info.metadata
  if metadata is None or REPORT_KEY not in metadata:
    return None
  return report_lib.PreparationReport.from_json(metadata[REPORT_KEY])
