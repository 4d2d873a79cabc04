"""From a config to batches: preparation, grain pipelines, pre-processing.

Data flow: a TFDS builder (ours or the catalogue's) is prepared once as
array_record; `builder.as_data_source(split)` gives random access without
TensorFlow; grain shards, shuffles, transforms and batches it.

Train: infinite, reshuffled every epoch, augmented, deterministic in
config.seed; its iterator's `get_state()` / `set_state()` let a resumed run
see exactly the batches it would have seen. Each process reads its own
strided shard (index i goes to process i % process_count) and yields
config.batch_size // process_count examples per batch.

Eval: finite, every example exactly once across processes, in full batches
padded at the end (`valid` = 0, `index` = -1 on padding), the same number
of batches on every process so collective ops never wait.

Workers: with config.dataset.num_workers > 0 (-1: sized to the host's
cores, `num_workers`) training batches are built in that many spawned
processes (grain's mp_prefetch) and a thread keeps
config.dataset.prefetch batches ready in this process; with 0, two threads
of this process build them ahead (decoding and PIL release the GIL). Batch
contents never depend on this. Evaluation reads with threads, since
spawning processes for every evaluation costs more than it saves on
validation-sized splits.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator

import grain
import numpy as np
from grain import experimental as grain_experimental

from lintunet_jax.data.datasets import catalogue, preparation, transforms

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class _Settings:
  """The part of the config the per-example code needs (cheap to pickle)."""
  image_size: int
  channels: int
  resize: str
  normalization: str
  augment: bool

  @classmethod
  def from_config(cls, config) -> _Settings:
    ds = config.dataset
    if ds.image_size % 16:
      raise ValueError(
          f'config.dataset.image_size={ds.image_size} must be a multiple of '
          '16: the U-Net halves it four times. Images of any size are '
          'resized or padded to it (config.dataset.resize).')
    if ds.resize not in transforms.RESIZE_MODES:
      raise ValueError(f'config.dataset.resize must be one of '
                       f'{transforms.RESIZE_MODES}, got {ds.resize!r}')
    if ds.normalization not in transforms.NORMALIZATIONS:
      raise ValueError(f'config.dataset.normalization must be one of '
                       f'{transforms.NORMALIZATIONS}, got {ds.normalization!r}')
    if ds.channels != config.model.in_channels:
      raise ValueError(
          f'config.dataset.channels={ds.channels} but config.model.in_channels='
          f'{config.model.in_channels}: the images are converted to '
          'dataset.channels and the model reads model.in_channels, so they '
          'must be equal (for RGB set both: --config.dataset.channels=3 '
          '--config.model.in_channels=3)')
    return cls(ds.image_size, ds.channels, ds.resize, ds.normalization,
               bool(ds.augment))


# --- Pre-processing: the one implementation, shared with predict.py. ------


def model_input_size(config) -> int:
  """The model's input edge: dataset.patch_size when training on patches at
  native resolution, else dataset.image_size (what whole images are resized
  or padded to). Configs saved before patch training lack patch_size."""
  patch = config.dataset.get('patch_size')
  return int(patch) if patch else int(config.dataset.image_size)


def check_config(config) -> None:
  """Raises ValueError naming the field when config.dataset cannot feed
  config.model (image size, resize, normalisation, channels). Programs call
  it before building anything, so a mismatch never reaches the model."""
  _Settings.from_config(config)


def preprocess_image(image: np.ndarray, config) -> np.ndarray:
  """Raw uint8 [H, W] or [H, W, C] image -> float32 [S, S, C] model input."""
  return _preprocess(image, _Settings.from_config(config))


def restore_mask_size(mask: np.ndarray, original_hw, config) -> np.ndarray:
  """Model-size [S, S] mask -> original [H, W] (nearest; undoes padding)."""
  ds = config.dataset
  return transforms.restore_mask(np.asarray(mask), tuple(original_hw),
                                 ds.image_size, ds.resize)


def _fit(image: np.ndarray, settings: _Settings) -> np.ndarray:
  """uint8 image of any size and channel count -> uint8 [S, S, C]."""
  return transforms.fit_image(
      transforms.to_channels(image, settings.channels), settings.image_size,
      settings.resize)


def _preprocess(image: np.ndarray, settings: _Settings) -> np.ndarray:
  return transforms.normalize(transforms.to_unit_float(_fit(image, settings)),
                              settings.normalization)


def _model_example(image, mask, settings: _Settings,
                   rng: np.random.Generator | None) -> Batch:
  """One stored example -> model input; augmented when `rng` is given.

  Augmentation works on the model-size uint8 image (cheaper than at native
  size) and before normalisation, so intensity jitter means the same thing
  for 'unit' and 'standardize'.
  """
  mask = transforms.fit_mask(mask, settings.image_size, settings.resize)
  if rng is None:
    image = _preprocess(image, settings)
  else:
    image, mask = transforms.augment(_fit(image, settings), mask, rng)
    image = transforms.normalize(image, settings.normalization)
  return {'image': image, 'mask': mask.astype(np.int32)}


# --- Datasets. ------------------------------------------------------------


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


def num_examples(config, split: str) -> int:
  """Examples in `split` (train: after config.dataset.num_train_examples)."""
  return len(_source(config, split))


def _source(config, split: str):
  builder, report, prepared_now = _prepared_builder(config)
  if prepared_now:
    _print_summary(builder, report, prepared_now)
  available = list(builder.info.splits.keys())
  if split.split('[')[0] not in available:
    raise ValueError(
        f'{builder.name} has no split {split!r}; it has {available}. Set '
        'config.dataset.train_split / eval_split / test_split (TFDS slices '
        'such as "train[:90%]" work too).')
  source = builder.as_data_source(split)
  limit = config.dataset.num_train_examples
  if limit and split == config.dataset.train_split:
    if limit > len(source):
      raise ValueError(f'config.dataset.num_train_examples={limit} but '
                       f'{split!r} has only {len(source)} examples')
    source = _Subset(source, limit)
  return _ExampleSource(source, _reader(builder), config.model.num_classes)


class _Subset:
  """The first `limit` examples (TFDS stores them in hash order: a random
  subset, the same whatever the number of processes)."""

  def __init__(self, source, limit: int):
    self._source, self._limit = source, limit

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


class _ExampleSource:
  """Random access to (image, mask) pairs, whatever the builder stores."""

  def __init__(self, source, adapter, num_classes: int):
    self._source, self._adapter = source, adapter
    self._num_classes = num_classes

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    example = self._source[index]
    if self._adapter is None:
      return example['image'], example['mask']
    return catalogue.read_example(self._adapter, example, self._num_classes)


# --- Train. ---------------------------------------------------------------


class _TrainTransform(grain.transforms.RandomMap):

  def __init__(self, settings: _Settings):
    self._settings = settings

  def random_map(self, element, rng: np.random.Generator) -> Batch:
    image, mask = element
    return _model_example(image, mask, self._settings,
                          rng if self._settings.augment else None)


def create_train_iterator(config, *, process_index: int | None = None,
                          process_count: int | None = None
                          ) -> grain.DatasetIterator:
  """Infinite iterator of host-local training batches.

  Batches: `image` float32 [B, S, S, C], `mask` int32 [B, S, S] with
  B = config.batch_size // process_count. The iterator's get_state() is a
  JSON-serialisable dict; set_state() resumes at exactly that batch.
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch(config.batch_size, process_count, 'batch_size')
  settings = _Settings.from_config(config)
  source = _source(config, config.dataset.train_split)
  shard = grain.MapDataset.source(source)[process_index::process_count]
  if len(shard) == 0:
    raise ValueError(f'process {process_index} of {process_count} has no '
                     'training examples: the split is smaller than the '
                     'number of processes')
  seed = _process_seed(config.seed, process_index)
  dataset = (shard.shuffle(seed=seed)
             .repeat(None)  # reseeds the shuffle every epoch
             .random_map(_TrainTransform(settings), seed=seed)
             .batch(local_batch, drop_remainder=True))
  workers = num_workers(config)
  prefetch = max(1, config.dataset.prefetch)
  if workers > 0:
    _allow_grain_flags_without_absl_app()
    iterable = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=prefetch)
    ).map(_out_of_shared_memory)
    iterable = grain_experimental.ThreadPrefetchIterDataset(
        iterable, prefetch_buffer_size=prefetch)
  else:
    iterable = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=2, prefetch_buffer_size=max(2, prefetch)))
  return iter(iterable)


def _out_of_shared_memory(batch: Batch) -> Batch:
  """Copies a batch from the workers' shared memory into ordinary arrays.

  grain hands worker batches over as views of shared-memory blocks that are
  unlinked when the view is garbage-collected. A batch given to JAX on CPU
  may be aliased rather than copied, and whatever still holds the last
  batches when the program exits (collected only at shutdown, after grain's
  deletion thread stopped) left "leaked shared_memory objects" warnings at
  the end of every run with workers. Copying here, in the prefetch thread,
  releases each block as soon as its batch arrives (a memcpy of a batch).
  """
  return {key: np.array(value) for key, value in batch.items()}


# --- Eval. ----------------------------------------------------------------


class _PaddedShard:
  """This process's strided share of a split, padded to whole batches."""

  def __init__(self, source, process_index: int, process_count: int,
               padded_length: int, settings: _Settings, native: bool = False):
    self._source, self._settings, self._native = source, settings, native
    self._indices = np.arange(process_index, len(source), process_count)
    self._length = padded_length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, position: int) -> Batch:
    size, channels = self._settings.image_size, self._settings.channels
    if position >= len(self._indices):
      padding = {'image': np.zeros((size, size, channels), np.float32),
                 'mask': np.zeros((size, size), np.int32),
                 'region': np.zeros((size, size), np.uint8),
                 'valid': np.float32(0.0), 'index': np.int32(-1)}
      if self._native:
        padding['native_mask'] = np.zeros((0, 0), np.uint8)
      return padding
    index = int(self._indices[position])
    image, mask = self._source[index]
    example = _model_example(image, mask, self._settings, rng=None)
    example['region'] = transforms.fit_mask(
        np.ones(np.shape(mask)[:2], np.uint8), size, self._settings.resize)
    if self._native:
      example['native_mask'] = np.asarray(mask)
    return {**example, 'valid': np.float32(1.0), 'index': np.int32(index)}


def _stack_batch(examples) -> Batch:
  """grain's batching, except that 'native_mask' (one size per image) stays
  a list."""
  return {key: ([e[key] for e in examples] if key == 'native_mask'
                else np.stack([e[key] for e in examples]))
          for key in examples[0]}


def create_eval_iterator(config, split: str, *, batch_size: int | None = None,
                         process_index: int | None = None,
                         process_count: int | None = None,
                         native_masks: bool = False) -> Iterator[Batch]:
  """Finite iterator over `split`: every example once, full padded batches.

  Batches add `valid` float32 [b] (1 real, 0 padding), `index` int32 [b]
  (position in the split; -1 on padding) and `region` uint8 [b, S, S] (1
  where the image lies, 0 on the canvas `resize='pad'` adds and on padding
  examples) to `image` and `mask`. With `native_masks`, also
  `native_mask`: a list of the stored uint8 [H, W] masks at each image's
  own size (empty on padding), for metrics at native resolution.
  """
  process_index, process_count = _process(process_index, process_count)
  if batch_size is None:
    batch_size = _local_batch(config.eval_batch_size, process_count,
                              'eval_batch_size')
  settings = dataclasses.replace(_Settings.from_config(config), augment=False)
  source = _source(config, split)
  per_process = math.ceil(len(source) / process_count)
  num_batches = math.ceil(per_process / batch_size)
  shard = _PaddedShard(source, process_index, process_count,
                       num_batches * batch_size, settings, native=native_masks)
  dataset = grain.MapDataset.source(shard).batch(
      batch_size, batch_fn=_stack_batch if native_masks else None)
  threads = max(1, num_workers(config))
  return iter(dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(threads, 2))))


# --- Helpers. -------------------------------------------------------------


def num_workers(config) -> int:
  """config.dataset.num_workers, with -1 sized to this host's cores.

  Auto leaves two cores to the training process (its Python loop and the
  runtime's host threads) and caps at 32: past that, grain's workers
  compete for memory bandwidth more than they add decoding throughput.
  """
  workers = int(config.dataset.num_workers)
  if workers >= 0:
    return workers
  if workers != -1:
    raise ValueError(f'config.dataset.num_workers={workers}: use -1 (auto), '
                     '0 (threads in this process) or a positive count')
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return max(0, min(32, (cores or 1) - 2))


def _process(index: int | None, count: int | None) -> tuple[int, int]:
  if index is None or count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only when needed)
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
  if not 0 <= index < count:
    raise ValueError(f'process_index {index} not in [0, {count})')
  return index, count


def _local_batch(global_batch: int, process_count: int, name: str) -> int:
  if global_batch % process_count:
    raise ValueError(f'config.{name}={global_batch} is not divisible by the '
                     f'{process_count} processes')
  return global_batch // process_count


def _allow_grain_flags_without_absl_app() -> None:
  """grain's mp_prefetch reads an absl flag, which raises in programs that
  never parsed flags (tests, notebooks): grain issue #1355. Parsing nothing
  keeps every flag at its default; a later absl.app.run still parses argv."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _process_seed(seed: int, process_index: int) -> int:
  """A distinct, reproducible 32-bit seed per process (grain's range)."""
  return int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
