"""JAX vs the seed's PyTorch implementation, same machine, same run.

  python benchmarks/torch_comparison.py                 # 256x256, batch 2
  python benchmarks/torch_comparison.py --modes forward --rounds 5

The PyTorch side is the test-only reference of the seed's model
(tests/torch_reference.py: the seed's U-Net topology with
`linformer.Linformer(dim=512, seq_len=256, depth=1, heads=1, k=64)` from the
`linformer` package at the bottleneck), in the seed's NCHW layout and, as a
stronger baseline, channels_last. The JAX side is the same model
(configs/lintunet.py:seed, Linformer only) and LinTUNet's default
(Linformer + block-sparse). Both frameworks get the same number of CPU
threads: torch.set_num_threads(N) with N = the cores this process may use,
which is what XLA:CPU's thread pool uses.

Modes:
  forward  inference (torch: eval() + inference_mode(); JAX: eval-mode
           forward, jit-compiled), random images
  train    one optimisation step: forward in train mode, BCE-with-logits
           loss, backward, global-norm clipping to 1.0, Adam (lr 1e-3) -
           torch written out here as the seed's loop does it, JAX as
           `train_lib.make_train_step` (the state donated and threaded)

All variants of a mode run interleaved (one call of each per round, a short
untimed pause between calls so one framework's spinning worker threads do
not eat into the other's timing), each call ending when its results are
ready (`block_until_ready`; PyTorch on CPU is synchronous). Medians; the
JAX/PyTorch speed-up is the median over rounds of the per-round ratio.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / 'benchmarks', ROOT / 'tests'):
  if str(path) not in sys.path:
    sys.path.insert(0, str(path))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from attention_benchmark import (command_line, machine_info, paired_ratio,  # noqa: E402
                                 write_json)
from lintunet_jax.evaluation import throughput  # noqa: E402
from model_benchmark import _forward_call, _train_call  # noqa: E402


def torch_reference():
  """The seed's PyTorch model: tests/torch_reference.py."""
  import torch_reference as reference  # noqa: PLC0415 (needs torch + linformer)
  return reference


def _jax_seed_config_patch():
  """Makes model_benchmark's builders use configs/lintunet.py:seed for 'seed'."""
  import model_benchmark  # noqa: PLC0415
  from configs import lintunet as lintunet_config  # noqa: PLC0415

  class Seed:
    @staticmethod
    def get_config():
      return lintunet_config.get_config('seed')

  model_benchmark.MODELS['lintunet_seed'] = Seed


def _torch_calls(size: int, batch: int, threads: int, mode: str, channels_last: bool):
  import torch  # noqa: PLC0415
  reference = torch_reference()
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = reference.build('lintunet')
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  images = torch.randn(batch, 1, size, size).to(memory_format=fmt)
  if mode == 'forward':
    model.eval()

    def step():
      with torch.inference_mode():
        return model(images)
    return step
  model.train()
  masks = (torch.rand(batch, 1, size, size) > 0.5).float().to(memory_format=fmt)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  loss_fn = torch.nn.BCEWithLogitsLoss()

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(images), masks)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()
  return step


def run(args) -> dict:
  import torch  # noqa: PLC0415
  _jax_seed_config_patch()
  threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                             else os.cpu_count())
  results = []
  for mode in args.modes:
    calls, flops = {}, {}
    for name in ('lintunet_seed', 'lintunet'):
      build = _forward_call if mode == 'forward' else _train_call
      compiled, call_args = build(name, args.size, 'float32', args.batch)
      flops[name] = throughput.cost_analysis_flops(compiled)
      calls[f'jax/{name}'] = ('jax', compiled, call_args)
    for channels_last in (False, True):
      name = 'torch/seed_' + ('channels_last' if channels_last else 'nchw')
      calls[name] = ('torch', _torch_calls(args.size, args.batch, threads, mode, channels_last), None)
    state = {k: v[2] for k, v in calls.items()}

    def call(name):
      framework, fn, _ = calls[name]
      start = time.perf_counter()
      if framework == 'torch':
        fn()
      else:
        out = fn(*state[name])
        jax.block_until_ready(out)
        if mode == 'train':
          state[name] = (out[0], *state[name][1:])
      return time.perf_counter() - start

    for name in calls:  # warm-up (not timed)
      call(name)
    times = {name: [] for name in calls}
    start = time.perf_counter()
    for _ in range(args.rounds):
      for name in calls:
        time.sleep(args.pause_s)
        times[name].append(call(name))
      if time.perf_counter() - start > args.budget_s:
        break
    base = times['torch/seed_nchw']
    for name, t in times.items():
      stats = throughput.summarize(t)
      model_flops = flops['lintunet_seed' if 'seed' in name else 'lintunet']
      row = {'variant': name, 'mode': mode, 'size': args.size, 'batch': args.batch,
             'dtype': 'float32', 'threads': threads, 'latency_s': stats,
             'rounds': len(t), 'seconds_per_image': stats['median'] / args.batch,
             'images_per_s': args.batch / stats['median'],
             'flops_per_image_xla': model_flops / args.batch if model_flops else None}
      if model_flops:
        row['achieved_flops_per_s'] = model_flops / stats['median']
      row['speedup_vs_torch_seed_nchw'] = paired_ratio(base, t)
      row['speedup_vs_torch_seed_channels_last'] = paired_ratio(times['torch/seed_channels_last'], t)
      results.append(row)
      print(f'{mode:8s} {name:28s} {row["seconds_per_image"]:7.3f} s/img  '
            f'x{row["speedup_vs_torch_seed_nchw"]:.2f} vs torch NCHW, '
            f'x{row["speedup_vs_torch_seed_channels_last"]:.2f} vs torch channels_last',
            flush=True)
  return {'results': results, 'threads': threads, 'torch_threads': torch.get_num_threads(),
          'torch_config': torch.__config__.show()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', type=int, default=256)
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--modes', type=lambda s: s.split(','), default=['forward', 'train'])
  parser.add_argument('--threads', type=int, default=0, help='0: the usable cores')
  parser.add_argument('--pause-s', type=float, default=0.3)
  parser.add_argument('--budget-s', type=float, default=200.0,
                      help='per mode: stop adding rounds after this long')
  parser.add_argument('--out', default=str(ROOT / 'benchmarks/results/torch_comparison_cpu.json'))
  args = parser.parse_args()
  machine = machine_info()
  outcome = run(args)
  machine['load_average_at_end'] = os.getloadavg()
  summary = {}
  for r in outcome['results']:
    if r['variant'].startswith('jax/'):
      summary[f"{r['mode']}/{r['variant']}"] = {
          'speedup_vs_torch_seed_nchw': r['speedup_vs_torch_seed_nchw'],
          'speedup_vs_torch_seed_channels_last': r['speedup_vs_torch_seed_channels_last'],
          'met_1_2x': r['speedup_vs_torch_seed_nchw'] >= 1.2,
          'met_1_5x_stretch': r['speedup_vs_torch_seed_nchw'] >= 1.5}
  write_json(args.out, {
      'benchmark': 'torch_comparison',
      'command': command_line(),
      'machine': machine,
      'settings': {k: v for k, v in vars(args).items() if k != 'out'},
      'method': __doc__,
      'threads': outcome['threads'],
      'torch_num_threads': outcome['torch_threads'],
      'torch_build': outcome['torch_config'],
      'targets': summary,
      'results': outcome['results'],
  })


if __name__ == '__main__':
  main()
