"""The shared inference flags: None keeps the config's `inference` field,
given values reach `sliding_window.inference_settings`."""

import dataclasses

from absl import flags
import pytest

from lintunet_jax.evaluation import inference_flags
from lintunet_jax.evaluation import sliding_window as sw
from tests.evaluation import eval_testutil


def _parse(*argv):
  fv = flags.FlagValues()
  holders = inference_flags.define(fv)
  fv(['prog', *argv])
  assert tuple(holders) == inference_flags.NAMES
  return dataclasses.asdict(inference_flags.choice(holders))


def test_unset_flags_keep_the_config():
  config = eval_testutil.tiny_config('/unused')
  config.inference.overlap = 0.25
  config.dataset.patch_size = 32  # trained on patches: the window is on
  settings = sw.inference_settings(config, **_parse())
  assert (settings.window, settings.overlap, settings.tta) == (True, 0.25, 'none')


def test_given_flags_override_the_config():
  config = eval_testutil.tiny_config('/unused')
  settings = sw.inference_settings(config, **_parse(
      '--sliding_window', '--overlap=0.75', '--tta=flips', '--tile_batch_size=5'))
  assert (settings.window, settings.overlap, settings.tta,
          settings.tile_batch_size) == (True, 0.75, 'flips', 5)
  config.dataset.patch_size = 32
  assert not sw.inference_settings(config, **_parse('--nosliding_window')).window
  with pytest.raises(flags.IllegalFlagValueError):
    _parse('--tta=rotate90')
