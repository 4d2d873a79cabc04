"""Ensembles refuse workdirs whose models read or write different things."""

import pytest

from lintunet_jax import models
from lintunet_jax.evaluation import ensemble
from lintunet_jax.evaluation import report as evaluation
from lintunet_jax.training import checkpointing
from tests.evaluation import eval_testutil


@pytest.mark.parametrize('field,change', [
    ('model.num_classes', lambda c: setattr(c.model, 'num_classes', 3)),
    ('model input size', lambda c: setattr(c.dataset, 'image_size', 48)),
    ('model input size', lambda c: setattr(c.dataset, 'patch_size', 64)),
    ('dataset.normalization', lambda c: setattr(c.dataset, 'normalization', 'standardize')),
    ('model.in_channels', lambda c: setattr(c.model, 'in_channels', 3)),
])
def test_configs_that_differ_are_refused_naming_both_workdirs(field, change):
  first = eval_testutil.tiny_config('/unused')
  other = eval_testutil.tiny_config('/unused')
  ensemble.check_compatible(('runs/a', first), ('runs/b', other))  # equal: fine
  change(other)
  with pytest.raises(evaluation.EvaluationError) as raised:
    ensemble.check_compatible(('runs/a', first), ('runs/b', other))
  message = str(raised.value)
  assert "'runs/a'" in message and "'runs/b'" in message and field in message


def test_restore_members_stops_at_the_first_mismatch(tmp_path):
  config = eval_testutil.tiny_config(tmp_path / 'tfds')
  checkpointing.write_weights_checkpoint(
      tmp_path / 'binary', config, models.create_model(config.model, seed=0), step=1)
  config.model.num_classes = 3
  checkpointing.write_weights_checkpoint(
      tmp_path / 'three', config, models.create_model(config.model, seed=0), step=2)
  with pytest.raises(evaluation.EvaluationError,
                     match=r"binary'.*three'.*model.num_classes differ \(1 vs 3\)"):
    ensemble.restore_members([str(tmp_path / 'binary'), str(tmp_path / 'three')],
                             'latest')


def _tokens(config, edge):
  config.model.attention.seq_len = (edge // 16) ** 2


# (field named in the refusal, change to the second member's config); every
# entry of ensemble.MUST_AGREE is covered (dataset.channels moves with
# model.in_channels: a config where they differ is refused on its own).
DIFFERENCES = [
    ('model.num_classes', lambda c: setattr(c.model, 'num_classes', 3)),
    ('model input size', lambda c: (setattr(c.dataset, 'image_size', 48), _tokens(c, 48))),
    ('model input size', lambda c: (setattr(c.dataset, 'patch_size', 64), _tokens(c, 64))),
    ('dataset.normalization', lambda c: setattr(c.dataset, 'normalization', 'standardize')),
    ('model.in_channels', lambda c: (setattr(c.model, 'in_channels', 3),
                                     setattr(c.dataset, 'channels', 3))),
    ('threshold', lambda c: setattr(c, 'threshold', 0.7)),
]


def _pair(tmp_path, change=None):
  config = eval_testutil.tiny_config(tmp_path / 'tfds')
  first, second = str(tmp_path / 'first'), str(tmp_path / 'second')
  checkpointing.write_weights_checkpoint(
      first, config, models.create_model(config.model, seed=0), step=1)
  if change is not None:
    change(config)
  checkpointing.write_weights_checkpoint(
      second, config, models.create_model(config.model, seed=1), step=1)
  return [first, second]


def test_predict_and_export_accept_the_same_ensemble(tmp_path):
  from lintunet_jax import export  # pylint: disable=g-import-not-at-top
  workdirs = _pair(tmp_path)
  assert len(ensemble.restore_members(workdirs, 'latest')) == 2
  assert len(export.restore_members(workdirs, 'latest')) == 2


@pytest.mark.slow
@pytest.mark.parametrize('field,change', DIFFERENCES)
def test_predict_and_export_refuse_alike(tmp_path, field, change):
  """predict.py / eval.py and the export restore through one function, so
  a refused ensemble is refused by both with the same message."""
  from lintunet_jax import export  # pylint: disable=g-import-not-at-top
  workdirs = _pair(tmp_path, change)
  with pytest.raises(evaluation.EvaluationError) as by_predict:
    ensemble.restore_members(workdirs, 'latest')
  with pytest.raises(export.ExportError) as by_export:
    export.restore_members(workdirs, 'latest')
  assert str(by_predict.value) == str(by_export.value)
  assert field in str(by_predict.value)
  assert workdirs[0] in str(by_predict.value) and workdirs[1] in str(by_predict.value)


def test_every_agreement_field_is_tested():
  assert {name.split(' (')[0] for name, _ in ensemble.MUST_AGREE} - {
      'dataset.channels'} == {field for field, _ in DIFFERENCES}
