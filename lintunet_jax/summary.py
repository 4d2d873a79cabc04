"""A torchsummary-style table of a configured model, with its cost.

  python -m lintunet_jax.summary --config configs/lintunet.py[:variant] [--depth 2]

Prints one row per module call (path, type, output shape, parameters),
`Total parameters: N`, and the forward GFLOPs per image that XLA's cost
analysis reports for the compiled model, which is what the hardware runs
(the seed's torchsummary could only count parameters).
"""

from __future__ import annotations

import logging
import sys

import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from flax import nnx
from ml_collections import config_flags

from lintunet_jax import models
from lintunet_jax.data import pipeline as input_pipeline

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Model config file.',
                                          lock_config=True)
_DEPTH = flags.DEFINE_integer('depth', 2, 'Module nesting depth to list.')


def _shapes(tree) -> str:
  leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, 'shape')]
  return ', '.join(str(list(x.shape)) for x in leaves) or '-'


def _param_counts(model: nnx.Module) -> dict[tuple, int]:
  """Parameters under every module path (prefix sums of the param tree)."""
  counts: dict[tuple, int] = {}
  for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    for i in range(len(path)):
      counts[tuple(path[:i])] = counts.get(tuple(path[:i]), 0) + int(value.size)
  return counts


def layer_rows(model: nnx.Module, image_shape: tuple[int, ...],
               depth: int) -> list[tuple[str, str, str, int]]:
  """(path, type, output shapes, parameters) for each module call."""
  calls = []

  def keep(call_info) -> bool:
    calls.append(call_info)
    return False

  nnx.tabulate(model, jnp.zeros((1, *image_shape), jnp.float32), depth=depth,
               row_filter=keep)
  counts = _param_counts(model)
  module_paths = {tuple(path) for path, _ in model.iter_modules()}
  rows = []
  for call in sorted(calls, key=lambda c: c.call_order):
    path = tuple(call.path)
    if path not in module_paths:
      continue  # a helper method of a module, not a layer
    name = '/'.join(str(p) for p in path) or '(model)'
    rows.append((name, call.type.__name__, _shapes(call.outputs), counts.get(path, 0)))
  return rows


def forward_flops_per_image(model: nnx.Module, image_shape: tuple[int, ...],
                            batch_size: int = 1) -> float:
  """FLOPs of one compiled inference forward pass, divided by the batch."""
  graphdef, state = nnx.split(model)

  def forward(state, images):
    return nnx.merge(graphdef, state)(images)

  images = jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32)
  cost = jax.jit(forward).lower(state, images).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops']) / batch_size


def format_table(rows) -> str:
  headers = ('Layer (path)', 'Type', 'Output shape', 'Param #')
  cells = [headers] + [(p, t, s, f'{n:,}') for p, t, s, n in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(4)]
  line = '-' * (sum(widths) + 6)
  fmt = lambda r: f'{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}'
  return '\n'.join([line, fmt(headers), '=' * len(line)] + [fmt(r) for r in cells[1:]] + [line])


def main(argv):
  del argv
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config configs/lintunet.py')
  model = models.create_model(config.model)
  model.eval()
  size = input_pipeline.model_input_size(config)
  image_shape = (size, size, config.model.in_channels)
  print(f'{config.model.name} ({config.model.dtype}), input {list(image_shape)}')
  print(format_table(layer_rows(model, image_shape, _DEPTH.value)))
  print(f'Total parameters: {models.count_parameters(model):,}')
  print(f'Forward GFLOPs per image (XLA cost analysis): '
        f'{forward_flops_per_image(model, image_shape) / 1e9:.2f}')
  sys.stdout.flush()


if __name__ == '__main__':
  app.run(main)
