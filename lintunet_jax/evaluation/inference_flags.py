"""The command-line flags of whole-image inference, for every tool that has
them: eval.py, predict.py and `python -m lintunet_jax.export`.

  INFERENCE = inference_flags.define()           # at import, like any flag
  settings = inference_flags.choice(INFERENCE).resolve(config)

Every flag defaults to None, which keeps the config's `inference` field
(`configs/default.py`), so a model trained on patches slides its window
without being told.
"""

from __future__ import annotations

from absl import flags

from lintunet_jax.evaluation import settings
from lintunet_jax.evaluation import sliding_window


NAMES = ('sliding_window', 'overlap', 'tta', 'tile_batch_size')


def define(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, flags.FlagHolder]:
  """Defines --[no]sliding_window, --overlap, --tta, --tile_batch_size."""
  return {
      'sliding_window': flags.DEFINE_boolean(
          'sliding_window', None, "Predict each image at its own size with a "
          "sliding window of the model's input size (default: the config's "
          'inference.sliding_window; on for models trained with '
          'dataset.patch_size).', flag_values=flag_values),
      'overlap': flags.DEFINE_float(
          'overlap', None, 'Share of a tile overlapping its neighbour, in '
          "[0, 1) (default: the config's inference.overlap, 0.5).",
          flag_values=flag_values),
      'tta': flags.DEFINE_enum(
          'tta', None, list(sliding_window.TTA_MODES), 'Test-time '
          "augmentation (default: the config's inference.tta, 'none'); "
          "'flips' averages the four mirrorings.", flag_values=flag_values),
      'tile_batch_size': flags.DEFINE_integer(
          'tile_batch_size', None, 'Tile positions per model call (default: '
          "the config's inference.tile_batch_size, else eval_batch_size).",
          flag_values=flag_values),
  }


def choice(holders: dict[str, flags.FlagHolder]) -> settings.InferenceChoice:
  """The flags' values (None: the config's)."""
  return settings.InferenceChoice(**{name: holder.value
                                     for name, holder in holders.items()})
