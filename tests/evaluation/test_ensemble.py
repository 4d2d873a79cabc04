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
