"""What evaluation and inference take, built once (from the flags of eval.py,
predict.py or the export) and passed down whole, frozen.

  settings = EvalSettings(split='test', inference=InferenceChoice(tta='flips'))
  report = whole_image_eval.run(['runs/fold0', 'runs/fold1'], settings)

Before, every layer took these as its own keyword list (up to 24
parameters) and passed them on by hand; a setting added to one layer and
forgotten in the next was silently dropped. Defaults are the flags'.
"""

from __future__ import annotations

import dataclasses

from lintunet_jax.evaluation import case_metrics
from lintunet_jax.evaluation import sliding_window as sw


@dataclasses.dataclass(frozen=True)
class InferenceChoice:
  """The command line's window and TTA choices; None keeps the config's
  `inference` group (`sliding_window.inference_settings`)."""

  sliding_window: bool | None = None
  overlap: float | None = None
  tta: str | None = None
  tile_batch_size: int | None = None

  def resolve(self, config) -> sw.InferenceSettings:
    """Raises ValueError for a value out of range."""
    return sw.inference_settings(config, **dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class ThroughputSettings:
  """eval.py's timings of the forward pass (and optionally a train step)."""

  measure: bool = True
  batch_sizes: tuple[int, ...] | None = None
  runs: int = 20
  warmup: int = 3
  peak_flops: float | None = None
  train_step: bool = False


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """eval.py's choices: which checkpoint, which split, where pixels are
  counted, how images become logits, what is timed and drawn, where the
  report goes (None: `report.default_report_path`)."""

  checkpoint: str | int | None = None
  split: str | None = None
  resolution: str = 'native'
  report_path: str | None = None
  num_overlays: int = 4
  batch_size: int | None = None
  progress: bool = False
  nsd_tolerance: float = case_metrics.DEFAULT_TOLERANCE
  inference: InferenceChoice = InferenceChoice()
  throughput: ThroughputSettings = ThroughputSettings()


@dataclasses.dataclass(frozen=True)
class PredictOptions:
  """predict.py's outputs besides the masks, and how inputs are read."""

  batch_size: int | None = None
  save_logits: bool = False
  overlays: bool = False
  recursive: bool = False
  progress: bool | None = None
