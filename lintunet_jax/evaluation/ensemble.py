"""The one way to restore models for inference: eval.py, predict.py and
the export all call `restore_members`; one model is a one-member ensemble.

  members = ensemble.restore_members(['runs/fold0', 'runs/fold1'], 'best')
  predict = sliding_window.make_predict_fn([m.model for m in members], settings)

nnU-Net predicts with the mean of its cross-validation folds' outputs.
Averaging logits only makes sense for models that read the same input,
write the same classes and turn logits into masks the same way, so
`check_compatible` compares the workdirs on `MUST_AGREE` (model input size,
input channels, classes, normalisation, channel conversion, threshold) and
names the two workdirs and the field that differ. The rest of the
preprocessing is the first member's (`members[0].config`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import ml_collections
from flax import nnx

from lintunet_jax import paths
from lintunet_jax.data import pipeline as input_pipeline
from lintunet_jax.evaluation import report as evaluation

# (field as the error names it, how to read it from a config)
MUST_AGREE: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ('model input size (dataset.patch_size or dataset.image_size)',
     input_pipeline.model_input_size),
    ('model.in_channels', lambda c: c.model.in_channels),
    ('model.num_classes', lambda c: c.model.num_classes),
    ('dataset.normalization', lambda c: c.dataset.normalization),
    ('dataset.channels', lambda c: c.dataset.channels),
    ('threshold', lambda c: c.threshold),
)


class IncompatibleMembers(evaluation.EvaluationError):
  """Workdirs whose models cannot be averaged (a MUST_AGREE field differs)."""


@dataclasses.dataclass
class Member:
  """One restored workdir of an ensemble."""
  workdir: str
  config: ml_collections.ConfigDict
  model: nnx.Module
  step: int
  selector: str | int

  def describe(self) -> dict:
    return {'workdir': paths.absolute(self.workdir), 'step': int(self.step),
            'checkpoint': str(self.selector), 'model': self.config.model.name}


def check_compatible(first: tuple[str, ml_collections.ConfigDict],
                     other: tuple[str, ml_collections.ConfigDict]) -> None:
  """Raises EvaluationError naming both workdirs and the first field on
  which their configs differ (MUST_AGREE)."""
  (first_dir, first_config), (other_dir, other_config) = first, other
  for field, read in MUST_AGREE:
    a, b = read(first_config), read(other_config)
    if a != b:
      raise IncompatibleMembers(
          f'cannot average the logits of workdirs {first_dir!r} and '
          f'{other_dir!r}: their {field} differ ({a!r} vs {b!r}); an '
          'ensemble needs models with the same input and classes')


def restore_members(workdirs: Sequence[str], checkpoint: str | int | None,
                    config: ml_collections.ConfigDict | None = None,
                    overrides: Mapping[str, Any] | None = None) -> list[Member]:
  """`report.restore` of every workdir (the same checkpoint selector,
  config replacement and overrides for each), checked against the first
  as each is restored, so a mismatch stops before the rest load."""
  if not workdirs:
    raise evaluation.EvaluationError('at least one --workdir is needed')
  members: list[Member] = []
  for workdir in workdirs:
    restored = evaluation.restore(workdir, checkpoint, config, overrides=overrides)
    member = Member(workdir, *restored)
    if members:
      check_compatible((members[0].workdir, members[0].config),
                       (workdir, member.config))
    members.append(member)
  return members
