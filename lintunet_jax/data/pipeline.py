"""From a config to batches: preparation, grain pipelines, pre-processing.

Data flow: a TFDS builder (ours or the catalogue's) is prepared once as
array_record; `builder.as_data_source(split)` gives random access without
TensorFlow (sources.py); grain shards, shuffles, transforms and batches it.

Train: infinite, reshuffled every epoch, augmented, deterministic in
config.seed; its iterator's `get_state()` / `set_state()` let a resumed run
see exactly the batches it would have seen. Each process reads its own
strided shard (index i goes to process i % process_count) and yields
config.batch_size // process_count examples per batch.

Eval: finite, every example exactly once across processes, in full batches
padded at the end (`valid` = 0, `index` = -1 on padding), the same number
of batches on every process so collective ops never wait.

Patches (config.dataset.patch_size, lintunet_jax/data/patches.py): train
examples are random patch_size crops of each image at its own size, and
validation cuts each image into a grid of tiles; nothing is resized.

Folds (lintunet_jax/data/folds.py): `cases` selects case ids (`case_ids`)
of a split, for cross-validation.

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

from lintunet_jax.data import patches, sources
from lintunet_jax.data.datasets import preparation, transforms

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class _Settings:
  """The part of the config the per-example code needs (cheap to pickle)."""
  image_size: int
  channels: int
  resize: str
  normalization: str
  augment: bool
  patch_size: int | None = None  # native-resolution patches instead of resizing
  foreground_fraction: float = 0.0

  @classmethod
  def from_config(cls, config) -> _Settings:
    ds = config.dataset
    patch_size = ds.get('patch_size')
    if patch_size is not None:
      # image_size and resize are not read: nothing is resized.
      if not isinstance(patch_size, int) or patch_size <= 0 or patch_size % 16:
        raise ValueError(
            f'config.dataset.patch_size={patch_size!r} must be a positive '
            'multiple of 16: the U-Net halves it four times')
      fraction = ds.get('foreground_fraction', 0.33)
      if not 0.0 <= fraction <= 1.0:
        raise ValueError(f'config.dataset.foreground_fraction={fraction} must '
                         'be in [0, 1] (the share of patches centred on a '
                         'foreground pixel)')
    else:
      fraction = 0.0
      if ds.image_size % 16:
        raise ValueError(
            f'config.dataset.image_size={ds.image_size} must be a multiple of '
            '16: the U-Net halves it four times. Images of any size are '
            'resized or padded to it (config.dataset.resize).')
      if ds.resize not in transforms.RESIZE_MODES:
        raise ValueError(f'config.dataset.resize must be one of '
                         f'{transforms.RESIZE_MODES}, got {ds.resize!r}')
    _check_folds(ds)
    if ds.normalization not in transforms.NORMALIZATIONS:
      raise ValueError(f'config.dataset.normalization must be one of '
                       f'{transforms.NORMALIZATIONS}, got {ds.normalization!r}')
    volume_slices = preparation.base_name(ds.name) == 'nnunet_raw'
    if volume_slices != (ds.normalization == 'stored'):
      raise ValueError(
          f'config.dataset.normalization={ds.normalization!r} with '
          f'config.dataset.name={ds.name!r}: nnunet_raw stores its slices '
          "normalised and is read with 'stored'; every other dataset stores "
          "uint8 images, read with 'unit', 'standardize' or 'seed'")
    if ds.channels != config.model.in_channels:
      raise ValueError(
          f'config.dataset.channels={ds.channels} but config.model.in_channels='
          f'{config.model.in_channels}: the images are converted to '
          'dataset.channels and the model reads model.in_channels, so they '
          'must be equal (for RGB set both: --config.dataset.channels=3 '
          '--config.model.in_channels=3)')
    return cls(ds.image_size, ds.channels, ds.resize, ds.normalization,
               bool(ds.augment), patch_size, float(fraction))


def _check_folds(ds) -> None:
  fold = ds.get('fold')
  if fold is None:
    return
  if ds.get('splits_file'):
    if fold < 0:  # the file's number of folds is checked when it is read
      raise ValueError(f'config.dataset.fold={fold} must be >= 0')
    return
  if ds.num_folds < 2:
    raise ValueError(f'config.dataset.num_folds={ds.num_folds} must be >= 2')
  if not 0 <= fold < ds.num_folds:
    raise ValueError(f'config.dataset.fold={fold} must be in [0, '
                     f'{ds.num_folds}) (config.dataset.num_folds='
                     f'{ds.num_folds})')


# --- Pre-processing: the one implementation, shared with predict.py. ------


def model_input_size(config) -> int:
  """The model's input edge: dataset.patch_size when training on patches at
  native resolution, else dataset.image_size (what whole images are resized
  or padded to). Configs saved before patch training lack patch_size."""
  patch = config.dataset.get('patch_size')
  return int(patch) if patch else int(config.dataset.image_size)


def check_config(config) -> None:
  """Raises ValueError naming the field when config.dataset cannot feed
  config.model (image or patch size, resize, normalisation, channels,
  fold). Programs call it before building anything, so a mismatch never
  reaches the model."""
  _Settings.from_config(config)


def preprocess_image(image: np.ndarray, config) -> np.ndarray:
  """Raw uint8 [H, W] or [H, W, C] image (or float32 volume slice) ->
  float32 [S, S, C] model input."""
  return _preprocess(image, _Settings.from_config(config))


def restore_mask_size(mask: np.ndarray, original_hw, config) -> np.ndarray:
  """Model-size [S, S] mask -> original [H, W] (nearest; undoes padding)."""
  ds = config.dataset
  return transforms.restore_mask(np.asarray(mask), tuple(original_hw),
                                 ds.image_size, ds.resize)


def _fit(image: np.ndarray, settings: _Settings) -> np.ndarray:
  """Image of any size (uint8 of any channel count, or float32 volume slice
  of settings.channels) -> [S, S, C] in its own dtype."""
  return transforms.fit_image(
      transforms.to_channels(image, settings.channels), settings.image_size,
      settings.resize)


def _preprocess(image: np.ndarray, settings: _Settings) -> np.ndarray:
  return transforms.to_model_input(_fit(image, settings), settings.normalization)


def _model_example(image, mask, settings: _Settings,
                   rng: np.random.Generator | None) -> Batch:
  """One stored example -> model input; augmented when `rng` is given.

  Augmentation works on the model-size uint8 image (cheaper than at native
  size) and before normalisation, so intensity jitter means the same thing
  for 'unit' and 'standardize'; float volume slices are augmented as
  stored (normalised), in z-score units.
  """
  mask = transforms.fit_mask(mask, settings.image_size, settings.resize)
  if rng is None:
    image = _preprocess(image, settings)
  else:
    image, mask = transforms.augment(_fit(image, settings), mask, rng)
    image = transforms.normalize(image, settings.normalization)
  return {'image': image, 'mask': mask.astype(np.int32)}


# --- Datasets (sources.py). ---------------------------------------------

prepare_dataset = sources.prepare_dataset
case_ids = sources.case_ids
unique_case_ids = sources.unique_case_ids
case_indices = sources.case_indices


def num_examples(config, split: str) -> int:
  """Examples in `split` (train: after config.dataset.num_train_examples)."""
  return len(sources.source(config, split))


# --- Train. ---------------------------------------------------------------


class _TrainTransform(grain.transforms.RandomMap):

  def __init__(self, settings: _Settings):
    self._settings = settings

  def random_map(self, element, rng: np.random.Generator) -> Batch:
    image, mask = element
    settings = self._settings
    if settings.patch_size:  # the crop is random even without augment
      return patches.train_example(
          image, mask, size=settings.patch_size, channels=settings.channels,
          normalization=settings.normalization,
          foreground_fraction=settings.foreground_fraction,
          augment=settings.augment, rng=rng)
    return _model_example(image, mask, self._settings,
                          rng if self._settings.augment else None)


def create_train_iterator(config, *, process_index: int | None = None,
                          process_count: int | None = None,
                          cases=None) -> grain.DatasetIterator:
  """Infinite iterator of host-local training batches.

  Batches: `image` float32 [B, S, S, C], `mask` int32 [B, S, S] with
  B = config.batch_size // process_count and S = model_input_size (random
  native-resolution crops with dataset.patch_size). `cases`: case ids
  (`case_ids`) of the train split to read instead of all, e.g. a fold's
  "train" (folds.resolve); needed when config.dataset.fold is set. The
  iterator's get_state() is a JSON-serialisable dict; set_state() resumes
  at exactly that batch.
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch(config.batch_size, process_count, 'batch_size')
  settings = _Settings.from_config(config)
  split = config.dataset.train_split
  source = sources.source(config, split)
  if cases is not None:
    source = sources.Picked(source, sources.case_indices(config, split, cases))
  elif config.dataset.get('fold') is not None:
    raise ValueError(
        f'config.dataset.fold={config.dataset.fold}: pass the fold\'s "train" '
        'cases (folds.resolve), or the whole train split would be read')
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
  """This process's share (`items`) of a split, padded to whole batches:
  `read(item)` makes an example of an item, `padding` fills the rest."""

  def __init__(self, items, padded_length: int, read, padding: Batch):
    self._items, self._length = items, padded_length
    self._read, self._padding = read, padding

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, position: int) -> Batch:
    if position >= len(self._items):
      return dict(self._padding)
    return self._read(self._items[position])


def _padding_example(size: int, channels: int, native: bool) -> Batch:
  padding = {'image': np.zeros((size, size, channels), np.float32),
             'mask': np.zeros((size, size), np.int32),
             'region': np.zeros((size, size), np.uint8),
             'valid': np.float32(0.0), 'index': np.int32(-1)}
  if native:
    padding['native_mask'] = np.zeros((0, 0), np.uint8)
  return padding


class _WholeImages:
  """Split index -> the whole image resized or padded to image_size."""

  def __init__(self, source, settings: _Settings, native: bool):
    self._source, self._settings, self._native = source, settings, native

  def __call__(self, index) -> Batch:
    index = int(index)
    image, mask = self._source[index]
    example = _model_example(image, mask, self._settings, rng=None)
    example['region'] = transforms.fit_mask(
        np.ones(np.shape(mask)[:2], np.uint8), self._settings.image_size,
        self._settings.resize)
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
                         native_masks: bool = False,
                         cases=None) -> Iterator[Batch]:
  """Finite iterator over `split`: every example once, full padded batches.

  Batches add `valid` float32 [b] (1 real, 0 padding), `index` int32 [b]
  (position in the split; -1 on padding) and `region` uint8 [b, S, S] (1
  where the image lies, 0 on the canvas `resize='pad'` adds and on padding
  examples) to `image` and `mask`. With `native_masks`, also
  `native_mask`: a list of the stored uint8 [H, W] masks at each image's
  own size (empty on padding), for metrics at native resolution. `cases`:
  case ids (`case_ids`) of the split to read instead of all (a fold's
  "val").

  With dataset.patch_size (P), the examples are tiles instead (validation's
  cheap stand-in for the sliding window): each image is cut into a grid of
  non-overlapping P x P tiles, padded at the bottom and right to whole
  tiles, with `region` 1 exactly on the image's pixels (so every native
  pixel counts once) and `index` the image's. Each process reads a
  contiguous share of the tiles. `native_masks` is refused: whole images
  at native size are predicted with the sliding window.
  """
  process_index, process_count = _process(process_index, process_count)
  if batch_size is None:
    batch_size = _local_batch(config.eval_batch_size, process_count,
                              'eval_batch_size')
  settings = dataclasses.replace(_Settings.from_config(config), augment=False)
  if settings.patch_size and native_masks:
    raise ValueError(
        f'config.dataset.patch_size={settings.patch_size}: a model trained on '
        'patches predicts whole images at native size with the sliding window '
        '(inference.sliding_window), not from batches of resized images; '
        'native_masks=True is not available in patch mode')
  source = sources.source(config, split)
  indices = (np.arange(len(source)) if cases is None
             else sources.case_indices(config, split, cases))
  if settings.patch_size:
    size = settings.patch_size
    items = np.array([(index, top, left) for index, (height, width)
                      in sources.image_sizes(source, indices).items()
                      for top, left in patches.tile_origins(height, width, size)],
                     np.int64).reshape(-1, 3)
    mine = np.array_split(items, process_count)[process_index]
    read = patches.TileReader(source, size=size, channels=settings.channels,
                              normalization=settings.normalization)
  else:
    size, items = settings.image_size, indices
    mine = items[process_index::process_count]
    read = _WholeImages(source, settings, native_masks)
  per_process = math.ceil(len(items) / process_count)
  num_batches = math.ceil(per_process / batch_size)
  shard = _PaddedShard(mine, num_batches * batch_size, read,
                       _padding_example(size, settings.channels, native_masks))
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
