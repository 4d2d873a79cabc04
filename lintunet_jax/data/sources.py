"""Reading prepared splits: (image, mask) pairs, case ids, image sizes.

A TFDS builder (ours or the catalogue's) is prepared once as array_record;
`builder.as_data_source(split)` gives random access without TensorFlow.
This module puts our (image, mask of class ids) convention on top, applies
config.dataset.num_train_examples to the train split, and names the
examples (case ids) so folds and per-case results can refer to them.

  prepare_dataset(config)          -> the prepared builder (prints a summary)
  source(config, split)            -> random access to (image, mask) pairs
  case_ids(config, split)          -> [str], one per example, in split order
                                      (a volume's slices share its id)
  unique_case_ids(config, split)   -> [str], each case once (folds)
  case_indices(config, split, ids) -> sorted positions of those cases' examples
  image_sizes(source, indices)     -> {index: (H, W)}, read once per process
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from lintunet_jax.data.datasets import catalogue, preparation

# The feature that names a volume slice's case (nnunet_raw).
CASE_FIELD = 'case_id'
# Case ids and image sizes of prepared splits, read once per process, by
# (data path, split, number of examples read).
_CASE_IDS: dict[tuple, list[str]] = {}
_SIZES: dict[tuple, dict[int, tuple[int, int]]] = {}


def prepare_dataset(config):
  """Prepares config.dataset (once; later calls reuse it) and returns the
  TFDS builder. Prints the preparation summary."""
  builder, report, prepared_now = _prepared_builder(config)
  _print_summary(builder, report, prepared_now)
  return builder


def _prepared_builder(config):
  """(builder, report, prepared_now); cheap when the data already exists,
  and still checks that it came from config.dataset.manual_dir."""
  builder = preparation.make_builder(config.dataset, config.model.num_classes)
  prepared_now = not builder.is_prepared()
  report = preparation.prepare(builder, config.dataset.manual_dir)
  return builder, report, prepared_now


def _print_summary(builder, report, prepared_now: bool) -> None:
  if report is not None:
    print(report.format())
  print(f'{builder.name}: {"prepared" if prepared_now else "reusing"} '
        f'{builder.data_path}')


def source(config, split: str) -> ExampleSource:
  """Random access to `split`'s (image, mask) pairs (train: after
  config.dataset.num_train_examples)."""
  builder, raw, key = _raw_source(config, split)
  return ExampleSource(raw, _reader(builder), config.model.num_classes, key)


def case_ids(config, split: str) -> list[str]:
  """The case id of each example of `split` (train: after
  config.dataset.num_train_examples), in split order.

  Volume slices (builders that store a `case_id`, nnunet_raw) share their
  volume's id, so every slice of a case follows it into a fold. Other
  examples are their own case: the `file_name` our builders store, or the
  example's index as a string for catalogue datasets without one; there,
  ids repeated within a split are an error. Case ids name cases in splits
  files (folds.py) and per-case results.
  """
  builder, raw, key = _raw_source(config, split)
  if key not in _CASE_IDS:
    features = builder.info.features
    field = next((name for name in (CASE_FIELD, 'file_name')
                  if name in features.keys()), None)
    if field is not None:
      names = _limited(config, split, fields_only(builder, split, (field,)))
      ids = [_text(names[i][field]) for i in range(len(names))]
    else:
      ids = [str(i) for i in range(len(raw))]
    if field != CASE_FIELD and len(set(ids)) != len(ids):
      seen, repeated = set(), set()
      for i in ids:
        (repeated if i in seen else seen).add(i)
      raise ValueError(
          f'{builder.name} split {split!r}: {len(repeated)} file_names appear '
          f'more than once (e.g. {sorted(repeated)[:3]}), so they cannot name '
          'cases for cross-validation; give the files unique names')
    _CASE_IDS[key] = ids
  return list(_CASE_IDS[key])


def fields_only(builder, split: str, keep) -> Any:
  """`split`'s data source decoding only the features `keep` (names, ids):
  reading them for a whole split never decodes an image."""
  features = builder.info.features
  skip = {name: tfds.decode.SkipDecoding() for name in features.keys()
          if name not in keep
          and not isinstance(features[name], tfds.features.FeaturesDict)}
  return builder.as_data_source(split, decoders=skip)


def unique_case_ids(config, split: str) -> list[str]:
  """The distinct cases of `split`, in order of first appearance (one per
  example except for volume slices): what folds are made of."""
  return list(dict.fromkeys(case_ids(config, split)))


def case_indices(config, split: str, cases) -> np.ndarray:
  """int64 [n]: the sorted positions in `split` of every example of the
  cases `cases` (all slices of a volume)."""
  ids = np.asarray(case_ids(config, split), dtype=object)
  known = set(ids.tolist())
  unknown = [case for case in cases if case not in known]
  if unknown:
    raise ValueError(f'{len(unknown)} case ids are not in split {split!r} of '
                     f'config.dataset.name={config.dataset.name!r}, e.g. '
                     f'{unknown[:5]}')
  wanted = set(cases)
  return np.array([i for i, case in enumerate(ids.tolist()) if case in wanted],
                  np.int64)


def image_sizes(examples: ExampleSource, indices) -> dict[int, tuple[int, int]]:
  """{index: (height, width)} of the split's images at `indices`, decoded
  once per process (validation in patch mode lays its tiles out from them
  every time it runs)."""
  sizes = _SIZES.setdefault(examples.key, {})
  for index in indices:
    if int(index) not in sizes:
      sizes[int(index)] = tuple(np.shape(examples[int(index)][1])[:2])
  return {int(i): sizes[int(i)] for i in indices}


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _raw_source(config, split: str):
  """(builder, the split's TFDS data source after num_train_examples, the
  key of its cached case ids and sizes)."""
  builder, report, prepared_now = _prepared_builder(config)
  if prepared_now:
    _print_summary(builder, report, prepared_now)
  available = list(builder.info.splits.keys())
  if split.split('[')[0] not in available:
    raise ValueError(
        f'{builder.name} has no split {split!r}; it has {available}. Set '
        'config.dataset.train_split / eval_split / test_split (TFDS slices '
        'such as "train[:90%]" work too).')
  raw = _limited(config, split, builder.as_data_source(split))
  return builder, raw, (str(builder.data_path), split, len(raw))


def _limited(config, split: str, raw):
  limit = config.dataset.num_train_examples
  if limit and split == config.dataset.train_split:
    if limit > len(raw):
      raise ValueError(f'config.dataset.num_train_examples={limit} but '
                       f'{split!r} has only {len(raw)} examples')
    raw = _Subset(raw, limit)
  return raw


class _Subset:
  """The first `limit` examples (TFDS stores them in hash order: a random
  subset, the same whatever the number of processes)."""

  def __init__(self, raw, limit: int):
    self._source, self._limit = raw, limit

  def __len__(self) -> int:
    return self._limit

  def __getitem__(self, index: int):
    if not 0 <= index < self._limit:
      raise IndexError(index)
    return self._source[index]


def _reader(builder):
  if preparation.is_ours(builder.name):
    return None  # stored as (image, mask of class ids) already
  return catalogue.adapter_for(builder.name, builder.info.features.keys())


class ExampleSource:
  """Random access to (image, mask) pairs, whatever the builder stores."""

  def __init__(self, raw, adapter, num_classes: int, key: tuple = ()):
    self._source, self._adapter = raw, adapter
    self._num_classes = num_classes
    self.key = key  # of the split's cached case ids and sizes

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    example = self._source[index]
    if self._adapter is None:
      return example['image'], example['mask']
    return catalogue.read_example(self._adapter, example, self._num_classes)


class Picked:
  """The examples of `examples` at `indices` (a fold's cases), in order."""

  def __init__(self, examples, indices: np.ndarray):
    self._source, self._indices = examples, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, position: int):
    return self._source[int(self._indices[position])]
