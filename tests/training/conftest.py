"""Fixtures of the training tests, shared across their modules."""

from __future__ import annotations

import pytest

from tests import train_testutil as tu


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  return tu.data_dir(tmp_path_factory)


@pytest.fixture(scope='session')
def train_setup(data_dir):
  """`tu.step_setup` (loss bce_dice) and its train step, compiled once
  (optimisation level 0) for every test that runs it: 'step'."""
  from lintunet_jax.training import loop as train_lib  # pylint: disable=g-import-not-at-top
  from lintunet_jax.training import parallel  # pylint: disable=g-import-not-at-top
  setup = tu.step_setup(data_dir, loss='bce_dice')
  step = train_lib.make_train_step(setup['model_def'], setup['tx'], setup['mesh'],
                                   loss='bce_dice')
  batch = parallel.shard_batch(setup['mesh'], setup['batch'])
  setup['step'] = step.lower(setup['new_state'](), batch).compile(
      compiler_options=tu.OPT0)
  return setup
