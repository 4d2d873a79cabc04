"""The recipes in configs/: consistent fields, and the :hires recipe trains.

A recipe is data, but a wrong one costs a user a run: a Linformer seq_len
that does not match the bottleneck's token count fails at the first step
(or, shorter, silently uses a prefix of the projection), and a high-res
pattern whose layout has no empty tile is dense attention in disguise.
"""

import numpy as np
import pytest

from configs import lintunet, unet
from lintunet_jax.attention import layout as layout_lib
from lintunet_jax.attention import masks
from lintunet_jax.data import pipeline as input_pipeline
from lintunet_jax.data import volume_config
from lintunet_jax.training import loop as train_lib
from lintunet_jax.training import metric_logs
from tests import train_testutil as tu

VARIANTS = ['', 'seed', 'quick', 'gpu', 'tpu', 'hires', 'patches', 'volumes_quick']


@pytest.mark.parametrize('module', [lintunet, unet], ids=['lintunet', 'unet'])
@pytest.mark.parametrize('variant', VARIANTS)
def test_seq_len_matches_the_bottleneck_tokens(module, variant, tmp_path):
  config = module.get_config(variant)
  if volume_config.is_volume_dataset(config):  # channels, classes from dataset.json
    config.dataset.data_dir = str(tmp_path)
    config = volume_config.resolve(config)
  input_pipeline.check_config(config)  # e.g. patch_size a multiple of 16
  tokens = (input_pipeline.model_input_size(config) // 16) ** 2
  assert config.model.attention.seq_len == tokens


def test_unknown_variant_names_the_known_ones():
  with pytest.raises(ValueError, match="'hires'"):
    lintunet.get_config('hi-res')


def test_hires_pattern_skips_most_tiles_of_the_64x64_grid():
  attention = lintunet.get_config('hires').model.attention
  grid = lintunet.get_config('hires').dataset.image_size // 16
  mask = masks.bind_grid(masks.parse_pattern(attention.pattern), grid)
  layout = layout_lib.block_layout(mask, grid * grid, attention.block_size)
  assert layout.density < 0.1
  # Every query sees its own 7x7 window and the global tokens, and the
  # global tokens see everything (checked on the dense mask, not the layout).
  idx = np.arange(grid * grid)
  dense = np.asarray(mask(idx[:, None], idx[None, :]), bool)
  assert dense[:4].all() and dense[:, :4].all()
  q = 30 * grid + 30  # an interior token: row 30, column 30
  window = [(30 + dr) * grid + 30 + dc for dr in range(-3, 4) for dc in range(-3, 4)]
  assert dense[q, window].all() and dense[q].sum() == 49 + 4


@pytest.mark.slow
def test_hires_recipe_trains_at_1024_on_cpu(tmp_path_factory, tmp_path):
  data_dir = tu.data_dir(tmp_path_factory)
  config = lintunet.get_config('hires')
  config.dataset.name = tu.DATASET  # 64x64 slices, resized up to 1024x1024
  config.dataset.data_dir = data_dir
  config.dataset.num_workers = 0
  config.model.width = 4  # the recipe's shape at a CPU-sized width
  config.per_device_batch_size = config.per_device_eval_batch_size = None
  config.batch_size, config.eval_batch_size = 1, 2
  config.dataset.num_train_examples = 4
  config.dataset.eval_split = 'validation[:2]'  # the final evaluation, at 1024x1024
  config.num_train_steps = 2
  config.eval_every_steps = config.checkpoint_every_steps = 100
  config.log_every_steps = 1
  config.progress_bar = False
  workdir = tmp_path / 'hires'
  final = train_lib.train_and_evaluate(config, str(workdir))
  losses = [r['loss'] for r in metric_logs.read_metrics(str(workdir), 'train')]
  assert len(losses) == 2 and np.all(np.isfinite(losses))
  assert 0 <= final['iou'] <= 1
