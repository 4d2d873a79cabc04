"""Batches of the uint8 (image) datasets, recorded before the input path
learnt float multi-channel volumes, so that change can be held to "exactly
as before" (tests/data/test_uint8_batches.py).

    python -m tests.data.uint8_batches   # rewrites tests/fixtures/uint8_batches.npz

Only rerun it for a change that is meant to alter these batches, and say
why in the commit. Each case reads synthetic_mri/small (prepared on the
fly) through one code path: augmented training at the model size, RGB
conversion with padding and per-image standardisation, the seed's
preprocessing, native-resolution patches, and evaluation batches.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

FIXTURE = ROOT / 'tests' / 'fixtures' / 'uint8_batches.npz'
CASES = {
    'train_augment_unit': dict(augment=True, normalization='unit'),
    'train_rgb_pad_standardize': dict(augment=True, normalization='standardize',
                                      resize='pad', channels=3),
    'train_seed_preprocessing': dict(augment=False, normalization='seed'),
    'train_patches': dict(augment=True, normalization='standardize', patch_size=32,
                          foreground_fraction=0.5),
    'eval_resize_unit': dict(normalization='unit'),
    'eval_patches': dict(normalization='standardize', patch_size=32),
}
BATCHES = 2


def config_for(data_dir: str, case: str):
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.seed = 3
  config.dataset.name = 'synthetic_mri/small'
  config.dataset.data_dir = data_dir
  config.dataset.image_size = 48
  config.dataset.num_workers = 0
  config.batch_size = 3
  config.eval_batch_size = 3
  for key, value in CASES[case].items():
    config.dataset[key] = value
  config.model.in_channels = config.dataset.channels
  return config


def batches(data_dir: str) -> dict[str, np.ndarray]:
  """name -> array, for every case's first BATCHES batches."""
  from lintunet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  out = {}
  for case in CASES:
    config = config_for(data_dir, case)
    pipeline.prepare_dataset(config)
    if case.startswith('train'):
      iterator = pipeline.create_train_iterator(config, process_index=0, process_count=1)
    else:
      iterator = pipeline.create_eval_iterator(config, 'validation', process_index=0,
                                               process_count=1)
    for b in range(BATCHES):
      for key, value in next(iterator).items():
        out[f'{case}/{b}/{key}'] = np.asarray(value)
  return out


def main() -> None:
  with tempfile.TemporaryDirectory() as data_dir:
    arrays = batches(data_dir)
  np.savez_compressed(FIXTURE, **arrays)
  print(f'{FIXTURE}: {len(arrays)} arrays, {FIXTURE.stat().st_size / 1024:.0f} KiB')


if __name__ == '__main__':
  main()
