"""Where the attention pays: the whole model's training step from 256 to 2048 px.

  python benchmarks/model_scaling.py                       # CPU: width 8, 256..2048
  python benchmarks/model_scaling.py --sizes 256,512 --rounds 2
  python benchmarks/model_scaling.py --width 64 --dtype bfloat16   # on a GPU

LinTUNet's bottleneck sees (H/16)(W/16) tokens: 256 at 256x256, 4,096 at
1024x1024, 16,384 at 2048x2048 (mammography, histology tiles). At each
size this times the real data-parallel training step (`training.loop`:
forward, backward, Adam; `model_benchmark._train_call`) of the U-Net and of
LinTUNet with each attention kind (dense, linformer, block_sparse,
linformer_block_sparse; the default pattern `local_2d(radius=2)`, 16-token
tiles, Linformer k=64 with seq_len = the size's token count), all in
interleaved rounds after warm-up (medians, `block_until_ready`), and
records the compiled step's planned peak memory (`memory_analysis()`).

The bottleneck's share of a step is measured two ways against the U-Net of
the same size, whose network is LinTUNet's minus the attention block:
  time share  = 1 - t(U-Net) / t(LinTUNet kind), median of per-round pairs;
  FLOP share  = 1 - FLOPs(U-Net) / FLOPs(LinTUNet kind) (XLA cost analysis
                of the lowered, unoptimised program, attention traced
                unchunked so loops are counted in full).
A configuration whose planned memory exceeds --max-gb is recorded as not
fitting (the finding "dense stops fitting"), not run. Writes
benchmarks/results/model_scaling_<backend>.json and prints a table and the
finding.
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

from attention_benchmark import (command_line, interleaved_times, lowered_flops,  # noqa: E402
                                 machine_info, memory_stats, paired_ratio, write_json)
import model_benchmark  # noqa: E402
from lintunet_jax.attention import xla as attention_kernels  # noqa: E402
from lintunet_jax.evaluation import throughput  # noqa: E402

KINDS = ('dense', 'linformer', 'block_sparse', 'linformer_block_sparse')


def _models(kinds=KINDS):
  yield 'unet', 'unet', {}
  for kind in kinds:
    yield f'lintunet/{kind}', 'lintunet', {'attention': {'kind': kind}}


def measure_size(size: int, args) -> list[dict]:
  rows, calls = {}, {}
  for label, name, fields in _models(getattr(args, 'kinds', KINDS)):
    row = {'size': size, 'tokens': (size // 16) ** 2, 'model': label, 'width': args.width,
           'dtype': args.dtype, 'batch': args.batch}
    rows[label] = row
    start = time.perf_counter()
    with attention_kernels.chunking(None):  # FLOPs: loops counted in full
      counted, call_args = model_benchmark.train_lowered(
          name, size, args.dtype, args.batch, width=args.width, **fields)
    timed = counted
    if label.endswith('block_sparse'):  # the backend's own (e.g. chunked) schedule is timed
      timed, call_args = model_benchmark.train_lowered(
          name, size, args.dtype, args.batch, width=args.width, **fields)
    # FLOPs of the unchunked program as lowered (no compile of its own; the
    # same count for every model, so the shares compare like with like);
    # one compile per configuration, of the timed program.
    row['flops_per_step'] = lowered_flops(counted)
    compiled = timed.compile()
    row['memory'] = memory_stats(compiled)
    row['compile_s'] = round(time.perf_counter() - start, 2)
    peak_gb = row['memory'].get('peak_bytes', 0) / 2**30
    if peak_gb > args.max_gb:
      row['fits'] = False
      row['skipped'] = f'needs {peak_gb:.1f} GB of planned memory (--max-gb={args.max_gb:g})'
      print(f'{size:5d} {label:32s} does not fit: {row["skipped"]}', flush=True)
      continue
    row['fits'] = True
    calls[label] = (compiled, call_args)
  times = interleaved_times(calls, args.rounds, warmup=1, carry=tuple(calls))
  unet_flops = rows['unet']['flops_per_step']
  for label, row in rows.items():
    if label not in times:
      continue
    row['step_s'] = throughput.summarize(times[label])
    if label != 'unet' and 'unet' in times:
      row['time_vs_unet'] = paired_ratio(times[label], times['unet'])
      row['attention_time_share'] = 1 - 1 / row['time_vs_unet']
      if unet_flops and row['flops_per_step']:
        row['attention_flop_share'] = 1 - unet_flops / row['flops_per_step']
    print(f'{size:5d} {label:32s} {row["step_s"]["median"]:8.3f} s/step  '
          f'{row["memory"]["peak_bytes"] / 2**30:6.2f} GB'
          + (f'  attention {row["attention_time_share"]:6.1%} of time, '
             f'{row.get("attention_flop_share", 0):6.1%} of FLOPs'
             if 'attention_time_share' in row else ''), flush=True)
  return list(rows.values())


def finding(results: list[dict]) -> dict:
  """The size where dense attention stops fitting or dominates the step."""
  dense = sorted((r for r in results if r['model'] == 'lintunet/dense'), key=lambda r: r['size'])
  best_sparse = {}
  for r in results:
    if r['model'] in ('lintunet/block_sparse', 'lintunet/linformer_block_sparse') and 'step_s' in r:
      best = best_sparse.get(r['size'])
      if best is None or r['step_s']['median'] < best['step_s']['median']:
        best_sparse[r['size']] = r
  out = {'dense_dominates_at': None, 'dense_does_not_fit_at': None, 'rows': []}
  for r in dense:
    sparse = best_sparse.get(r['size'])
    out['rows'].append({
        'size': r['size'], 'tokens': r['tokens'],
        'dense_attention_time_share': r.get('attention_time_share'),
        'dense_peak_gb': r['memory'].get('peak_bytes', 0) / 2**30,
        'best_sparse_kind': sparse and sparse['model'],
        'best_sparse_attention_time_share': sparse and sparse.get('attention_time_share'),
        'best_sparse_peak_gb': sparse and sparse['memory'].get('peak_bytes', 0) / 2**30})
    if not r['fits'] and out['dense_does_not_fit_at'] is None:
      out['dense_does_not_fit_at'] = r['size']
    if (r.get('attention_time_share') or 0) > 0.5 and out['dense_dominates_at'] is None:
      out['dense_dominates_at'] = r['size']
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', type=lambda s: [int(x) for x in s.split(',')],
                      default=[256, 512, 1024, 2048])
  parser.add_argument('--width', type=int, default=8)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--kinds', type=lambda s: [k for k in s.split(',') if k],
                      default=list(KINDS), help=f'LinTUNet attention kinds (of {",".join(KINDS)})')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--max-gb', type=float, default=16.0,
                      help='planned memory above which a step counts as not fitting')
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)
  unknown = set(args.kinds) - set(KINDS)
  if unknown:
    parser.error(f'--kinds: unknown {sorted(unknown)}; choose from {",".join(KINDS)}')
  out = args.out or str(ROOT / f'benchmarks/results/model_scaling_{jax.default_backend()}.json')
  machine = machine_info()
  start = time.perf_counter()
  results = []
  for size in args.sizes:
    results += measure_size(size, args)
  machine['load_average_at_end'] = os.getloadavg()
  summary = finding(results)
  print('finding:', summary['rows'], flush=True)
  write_json(out, {
      'benchmark': 'model_scaling', 'command': command_line(), 'machine': machine,
      'settings': vars(args), 'method': __doc__, 'wall_s': time.perf_counter() - start,
      'finding': summary, 'results': results})


if __name__ == '__main__':
  main()
