"""Whole model: U-Net vs LinTUNet, forward and training step, images/s.

  python benchmarks/model_benchmark.py                          # CPU defaults
  python benchmarks/model_benchmark.py --modes forward --sizes 256
  python benchmarks/model_benchmark.py --dtypes bfloat16 --batch 8 --rounds 10   # on a GPU

For each image size, compute dtype and mode, the U-Net and LinTUNet of the
default recipes (configs/unet.py, configs/lintunet.py; width 64, LinTUNet's
Linformer + block-sparse bottleneck with seq_len = (size/16)^2) run side by
side in interleaved rounds on the same random batch:

  forward  the jit-compiled inference forward pass (eval mode), as
           `lintunet_jax.evaluation.throughput.benchmark_forward` builds it
  train    `train_lib.make_train_step` (forward, backward, Adam update,
           synchronised BatchNorm over a one-device mesh), the state donated
           and threaded from step to step as in training

Reported per model: median latency and images/s, XLA cost-analysis FLOPs per
image, achieved FLOP/s, and the fraction of this device's *measured* peak
matmul rate (one large matmul of the same dtype, timed before and after
every configuration in the same run, the best kept; the datasheet peak where
`throughput.PEAK_FLOPS` knows the device). LinTUNet's
cost relative to U-Net is the median over rounds of the per-round ratio.
A global --budget-s bounds the run: configurations it cannot reach are
recorded as skipped.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / 'benchmarks'):
  if str(path) not in sys.path:
    sys.path.insert(0, str(path))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from attention_benchmark import (command_line, interleaved_times,  # noqa: E402
                                 machine_info, memory_stats, paired_ratio, write_json)
from configs import lintunet as lintunet_config  # noqa: E402
from configs import unet as unet_config  # noqa: E402
from lintunet_jax import models  # noqa: E402
from lintunet_jax.evaluation import throughput  # noqa: E402

MODELS = {'unet': unet_config, 'lintunet': lintunet_config}


def model_config(name: str, size: int, dtype: str, **model_fields):
  """The recipe's model at `size`; `model_fields` override config.model
  (`width`, or `attention` as a dict of attention fields)."""
  config = MODELS[name].get_config()
  config.model.dtype = dtype
  config.dataset.image_size = size
  config.model.attention.seq_len = (size // models.DOWNSAMPLING) ** 2
  for key, value in model_fields.items():
    if isinstance(value, dict):
      config.model[key].update(value)
    else:
      config.model[key] = value
  return config


def measure_peak_matmul(dtype: str, size: int | None = None, runs: int = 5) -> dict:
  """FLOP/s of one large square matmul: this device's practical peak."""
  if size is None:
    size = 8192 if jax.default_backend() in ('gpu', 'tpu') else 2048
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
  fn = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
  times = throughput.time_calls(fn, (a, b), warmup=2, runs=runs)
  best = min(times)
  return {'dtype': dtype, 'size': size, 'flops': 2 * size ** 3,
          'median_s': float(np.median(times)), 'min_s': best,
          'peak_flops_per_s': 2 * size ** 3 / best,
          'method': f'{size}x{size} @ {size}x{size} jitted matmul, best of {runs} '
                    '(block_until_ready), same run'}


def _forward_call(name: str, size: int, dtype: str, batch: int, **model_fields):
  model = models.create_model(model_config(name, size, dtype, **model_fields).model, seed=0)
  forward, state = throughput._eval_forward(model)  # pylint: disable=protected-access
  images = jax.random.normal(jax.random.key(1), (batch, size, size, 1), jnp.float32)
  compiled = jax.jit(forward).lower(state, images).compile()
  return compiled, (state, images)


def train_lowered(name: str, size: int, dtype: str, batch: int, **model_fields):
  """(lowered train step, its arguments), not compiled: what `_train_call`
  compiles, for callers that compare or cost programs before compiling."""
  from lintunet_jax.training import optim, parallel, loop as train_lib  # noqa: PLC0415
  from lintunet_jax.training import state as train_state_lib  # noqa: PLC0415
  config = model_config(name, size, dtype, **model_fields)
  mesh = parallel.create_mesh(jax.local_devices()[:1])
  model = models.create_model(config.model, seed=0, bn_axis_name=mesh.axis_names[0])
  model_def, variables = train_state_lib.split_model(model)
  optimizer = optim.create_optimizer(config, optim.create_learning_rate_schedule(config, 100, 1000))
  state = parallel.replicate(mesh, jax.device_get(
      train_state_lib.create_train_state(variables, optimizer, seed=0)))
  step = train_lib.make_train_step(model_def, optimizer, mesh, loss=config.loss)
  rng = np.random.default_rng(0)
  batch_arrays = parallel.shard_batch(mesh, {
      'image': rng.normal(size=(batch, size, size, 1)).astype(np.float32),
      'mask': rng.integers(0, 2, size=(batch, size, size)).astype(np.int32)})
  return step.lower(state, batch_arrays), (state, batch_arrays)


def _train_call(name: str, size: int, dtype: str, batch: int, **model_fields):
  lowered, call_args = train_lowered(name, size, dtype, batch, **model_fields)
  return lowered.compile(), call_args


def run(args) -> dict:
  results, peaks = [], {}
  deadline = time.perf_counter() + args.budget_s
  info = throughput.device_info()
  def remeasure_peaks():  # the best seen: a busy moment only lowers it
    for dtype in args.dtypes:
      peak = measure_peak_matmul(dtype)
      if dtype not in peaks or peak['peak_flops_per_s'] > peaks[dtype]['peak_flops_per_s']:
        peaks[dtype] = peak

  remeasure_peaks()
  for dtype in args.dtypes:
    print(f'measured peak matmul {dtype}: {peaks[dtype]["peak_flops_per_s"] / 1e9:.1f} GFLOP/s',
          flush=True)
  for size in args.sizes:
    batch = args.batch or (2 if size <= 256 else 1)
    rounds = args.rounds or (5 if size <= 256 else 2)
    for mode in args.modes:
      for dtype in args.dtypes:
        rows = {}
        if time.perf_counter() > deadline:
          for name in MODELS:
            results.append({'model': name, 'size': size, 'mode': mode, 'dtype': dtype,
                            'batch': batch, 'skipped': f'time budget --budget-s={args.budget_s:g} spent'})
          print(f'{size} {mode} {dtype}: skipped (budget)', flush=True)
          continue
        calls = {}
        for name in MODELS:
          start = time.perf_counter()
          build = _forward_call if mode == 'forward' else _train_call
          compiled, call_args = build(name, size, dtype, batch)
          flops = throughput.cost_analysis_flops(compiled)
          rows[name] = {'model': name, 'size': size, 'mode': mode, 'dtype': dtype,
                        'batch': batch, 'compile_s': time.perf_counter() - start,
                        'flops_per_image': flops / batch if flops else None,
                        'memory': memory_stats(compiled)}
          calls[name] = (compiled, call_args)
        remaining = deadline - time.perf_counter()
        times = interleaved_times(calls, rounds, warmup=1, budget_s=max(remaining, 0),
                                  carry=tuple(calls) if mode == 'train' else ())
        for name, row in rows.items():
          stats = throughput.summarize(times[name])
          row['latency_s'] = stats
          row['rounds'] = len(times[name])
          row['images_per_s'] = batch / stats['median']
          if row['flops_per_image']:
            achieved = row['flops_per_image'] * batch / stats['median']
            row['achieved_flops_per_s'] = achieved
            datasheet, source = throughput.peak_flops_per_s(info['device_kind'], dtype)
            if datasheet:
              row['fraction_of_datasheet_peak'] = achieved / datasheet
              row['datasheet_peak_source'] = source
        rows['lintunet']['time_vs_unet'] = paired_ratio(times['lintunet'], times['unet'])
        remeasure_peaks()
        for name, row in rows.items():
          print(f'{size}x{size} {mode:8s} {dtype:9s} {name:9s} batch {batch}: '
                f'{row["latency_s"]["median"]:7.2f} s/batch, {row["images_per_s"]:7.3f} img/s, '
                f'{(row["flops_per_image"] or 0) / 1e9:7.1f} GFLOP/img, '
                f'{row.get("achieved_flops_per_s", 0) / 1e9:6.1f} GFLOP/s'
                + (f', LinTUNet/U-Net time {row["time_vs_unet"]:.3f}' if 'time_vs_unet' in row else ''),
                flush=True)
          results.append(row)
  for row in results:  # against the best peak measured during the whole run
    if row.get('achieved_flops_per_s'):
      row['fraction_of_measured_peak'] = (row['achieved_flops_per_s']
                                          / peaks[row['dtype']]['peak_flops_per_s'])
  return {'results': results, 'measured_peak_matmul': peaks}


def check_targets(results: list[dict]) -> dict:
  out = []
  for r in results:
    if r['model'] == 'lintunet' and r['size'] == 256 and 'time_vs_unet' in r:
      out.append({'mode': r['mode'], 'dtype': r['dtype'],
                  'lintunet_time_over_unet': r['time_vs_unet'],
                  'met_at_most_5_percent_more': r['time_vs_unet'] <= 1.05})
  return {'lintunet_overhead_at_256': out}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ints = lambda s: [int(x) for x in s.split(',')]
  parser.add_argument('--sizes', type=ints, default=[256, 512])
  parser.add_argument('--dtypes', type=lambda s: s.split(','), default=['float32', 'bfloat16'])
  parser.add_argument('--modes', type=lambda s: s.split(','), default=['forward', 'train'])
  parser.add_argument('--batch', type=int, default=0, help='0: 2 at 256, 1 above')
  parser.add_argument('--rounds', type=int, default=0, help='0: 5 at 256, 2 above')
  parser.add_argument('--budget-s', type=float, default=450.0,
                      help='stop starting new configurations after this long')
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  platform = jax.default_backend()
  out = args.out or str(ROOT / f'benchmarks/results/model_{platform}.json')
  machine = machine_info()
  outcome = run(args)
  machine['load_average_at_end'] = os.getloadavg()
  write_json(out, {
      'benchmark': 'model',
      'command': command_line(),
      'machine': machine,
      'settings': {k: v for k, v in vars(args).items() if k != 'out'},
      'method': __doc__,
      'measured_peak_matmul': outcome['measured_peak_matmul'],
      'targets': check_targets(outcome['results']),
      'results': outcome['results'],
  })


if __name__ == '__main__':
  main()
