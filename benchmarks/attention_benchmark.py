"""Attention alone: dense vs Linformer vs block-sparse, forward and backward.

  python benchmarks/attention_benchmark.py                      # the full sweep
  python benchmarks/attention_benchmark.py --tokens 1024 --rounds 3   # quick

For each token count n (a sqrt(n) x sqrt(n) bottleneck grid: image sizes
256..2048 give 256..16384 tokens) and width 512, times the attention maths
from q, k, v ([batch, heads, n, width/heads]) to its output:

  dense                    softmax(q k^T) v over all n keys
  linformer                the k=64 sequence projections E k, F v, then
                           attention over those k summaries
  block_sparse/<pattern>   only the pattern's non-empty tiles
  linformer_block_sparse   both in one softmax (LinTUNet), default pattern
  pallas_block_sparse/<pattern>, pallas_linformer_block_sparse
                           the same maths as fused Pallas kernels
                           (`attention_kernels.schedule(kernel='pallas')`);
                           in the default kinds on GPUs only (elsewhere
                           they would run interpreted)

in two modes: `forward` and `forward_backward` (gradients of
sum(out * cotangent) w.r.t. q, k, v and the Linformer projections).

Measurement (all configurations of one (n, mode) side by side, so the shared
machine's noise hits them alike): each function is jit-compiled first
(compile time reported, never timed), warmed up once, then timed in
interleaved rounds - one call of every configuration per round, each call
timed with `time.perf_counter()` up to `jax.block_until_ready` on its
outputs, as `lintunet_jax.evaluation.throughput.time_calls` does - and summarised by
the median (`throughput.summarize`). Speed-ups vs dense are medians of the
per-round ratios. FLOPs are XLA's cost analysis of the lowered program,
traced unchunked (`attention_kernels.chunking(None)`: the CPU schedule's loops
would be counted once). Peak memory is the compiled executable's
`memory_analysis()` (arguments + outputs + temporaries as XLA's buffer
assignment plans them), not process RSS.

A configuration whose extrapolated time per call (FLOPs over the rate the
same kind reached at the previous size) exceeds --max-call-s, or whose
planned memory exceeds --max-gb, is recorded as skipped with the reason.
Writes one JSON file (machine, command, settings, results, target checks).
Helpers here (`machine_info`, `interleaved_times`) are shared by the other
benchmark scripts in this directory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lintunet_jax.attention import xla as attention_kernels  # noqa: E402
from lintunet_jax.attention import layout as block_layout  # noqa: E402
from lintunet_jax.attention import masks  # noqa: E402
from lintunet_jax.evaluation import throughput  # noqa: E402

# Patterns over a grid `w` tokens wide (w = sqrt(n)). Their parameters are
# fixed or scale with the grid as in the papers they come from.
PATTERNS = {
    # LinTUNet's default: a 5x5 window on the token grid.
    'local_2d': lambda w: f'local_2d(radius=2)',
    # A 1-D band of +-64 tokens (Child et al.'s local head).
    'local_1d': lambda w: 'local_1d(window=64)',
    # Child et al.'s strided pattern: a band of one grid row plus the column.
    'strided': lambda w: f'local_1d(window={w}) | strided(stride={w})',
    # Child et al.'s fixed pattern: blocks of one grid row, 4 summaries each.
    'fixed': lambda w: f'fixed(block={w}, summary=4)',
    # BigBird-like: 16 global tokens plus the 5x5 window.
    'global_local': lambda w: 'global_tokens(num=16) | local_2d(radius=2)',
}
DEFAULT_PATTERN = 'local_2d'


# ---------------------------------------------------------------- helpers


def machine_info() -> dict:
  """CPU model, cores, library versions, load: what produced the numbers."""
  cpu_model = platform.processor() or 'unknown'
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          cpu_model = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  try:
    lscpu = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10).stdout
    lscpu = {k.strip(): v.strip() for k, v in
             (l.split(':', 1) for l in lscpu.splitlines() if ':' in l)}
  except (OSError, subprocess.SubprocessError):
    lscpu = {}
  versions = {'python': platform.python_version(), 'jax': jax.__version__,
              'numpy': np.__version__}
  for name in ('jaxlib', 'flax', 'torch', 'linformer'):
    try:
      from importlib import metadata  # noqa: PLC0415
      versions[name] = metadata.version(name)
    except Exception:  # pylint: disable=broad-except
      pass
  flags = set(lscpu.get('Flags', '').split())
  return {
      'cpu_model': cpu_model,
      'cpu_family_model': f"{lscpu.get('CPU family', '?')}/{lscpu.get('Model', '?')}",
      'logical_cpus': os.cpu_count(),
      'usable_cpus': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
      'isa': sorted(f for f in flags if f.startswith(('avx', 'fma', 'amx'))),
      'memory_gb': round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30, 1),
      'load_average_at_start': os.getloadavg(),
      'jax_devices': [str(d) for d in jax.devices()],
      **throughput.device_info(),
      'versions': versions,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'date_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }


def command_line() -> str:
  return ' '.join(['python'] + [sys.argv[0]] + sys.argv[1:])


def interleaved_times(calls: dict, rounds: int, warmup: int = 1,
                      budget_s: float | None = None,
                      carry: tuple[str, ...] = ()) -> dict[str, list[float]]:
  """Per-call seconds of each `name -> (fn, args)`, one call of each per round.

  Each call is timed as `throughput.time_calls` times it (perf_counter around
  the call and `jax.block_until_ready` on its outputs), one call at a time so
  that configurations alternate, which time_calls cannot do for a carried
  train state; warm-up calls are not timed. Names in `carry` are train steps
  that donate their first argument: each call gets the previous call's first
  output instead.
  Stops early (after at least one round) once `budget_s` has passed.
  """
  args = {name: tuple(a) for name, (_, a) in calls.items()}

  def call(name, timed):
    fn = calls[name][0]
    if not timed:
      out = jax.block_until_ready(fn(*args[name]))
      seconds = None
    else:
      start = time.perf_counter()
      out = fn(*args[name])
      jax.block_until_ready(out)
      seconds = time.perf_counter() - start
    if name in carry:
      args[name] = (out[0], *args[name][1:])
    return seconds

  for name in calls:
    for _ in range(warmup):
      call(name, timed=False)
  times = {name: [] for name in calls}
  start = time.perf_counter()
  for _ in range(rounds):
    for name in calls:
      times[name].append(call(name, timed=True))
    if budget_s is not None and time.perf_counter() - start > budget_s:
      break
  return times


def paired_ratio(base: list[float], other: list[float]) -> float:
  """Median over rounds of base/other (same-round pairs share the noise)."""
  k = min(len(base), len(other))
  return float(np.median(np.asarray(base[:k]) / np.asarray(other[:k])))


def memory_stats(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  stats = {'argument_bytes': int(m.argument_size_in_bytes),
           'output_bytes': int(m.output_size_in_bytes),
           'temp_bytes': int(m.temp_size_in_bytes),
           'alias_bytes': int(m.alias_size_in_bytes)}
  planned = stats['argument_bytes'] + stats['output_bytes'] + stats['temp_bytes'] - stats['alias_bytes']
  peak = int(getattr(m, 'peak_memory_in_bytes', 0) or 0)
  stats['peak_bytes'] = max(planned, peak)
  return stats


def lowered_flops(lowered) -> float | None:
  try:
    cost = lowered.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def write_json(path: str, payload: dict) -> None:
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(payload, indent=1, default=float) + '\n')
  print(f'wrote {out}', flush=True)


# ---------------------------------------------------------------- the sweep


KINDS = ('dense', 'linformer', 'block_sparse', 'linformer_block_sparse',
         'pallas_block_sparse', 'pallas_linformer_block_sparse')


def default_kinds() -> list[str]:
  kinds = list(KINDS[:4])
  return kinds + list(KINDS[4:]) if jax.default_backend() == 'gpu' else kinds


def _configs(grid: int, kinds: list[str], patterns: list[str]):
  """(name, kind, pattern name, pattern spec) of each configuration."""
  out = []
  for kind in kinds:
    if kind not in KINDS:
      raise ValueError(f'unknown kind {kind!r}; choose from {KINDS}')
    if kind in ('dense', 'linformer'):
      out.append((kind, kind, None, None))
    elif kind.endswith('linformer_block_sparse'):
      p = DEFAULT_PATTERN
      out.append((f'{kind}/{p}', kind, p, PATTERNS[p](grid)))
    else:
      out += [(f'{kind}/{p}', kind, p, PATTERNS[p](grid)) for p in patterns]
  return out


def _attention_fn(kind: str, mask, block: int):
  kernel = 'pallas' if kind.startswith('pallas_') else 'xla'
  kind = kind.removeprefix('pallas_')

  # Off GPU the Pallas kernels run only when interpreted explicitly.
  interpret = True if kernel == 'pallas' and jax.default_backend() != 'gpu' else None

  def fn(q, k, v, proj_k, proj_v):
    with attention_kernels.schedule(kernel=kernel, pallas_interpret=interpret):  # read at trace time
      return attend(q, k, v, proj_k, proj_v)

  def attend(q, k, v, proj_k, proj_v):
    if kind == 'dense':
      return attention_kernels.dense_attention(q, k, v)
    global_kv = None
    if kind.startswith('linformer'):
      global_kv = (jnp.einsum('bhnd,nk->bhkd', k, proj_k.astype(k.dtype)),
                   jnp.einsum('bhnd,nk->bhkd', v, proj_v.astype(v.dtype)))
    if kind == 'linformer':
      return attention_kernels.dense_attention(q, *global_kv)
    return attention_kernels.block_sparse_attention(
        q, k, v, mask=mask, block_size=block, global_kv=global_kv)
  return fn


def _forward_backward(fn, kind: str):
  """(q, k, v, proj_k, proj_v, cotangent) -> gradients. The cotangent is an
  argument, not a closed-over constant: XLA would constant-fold its gathers
  at compile time (minutes on GPU) and time a backward with less work."""
  argnums = (0, 1, 2, 3, 4) if 'linformer' in kind else (0, 1, 2)

  def loss(*args):
    *inputs, cotangent = args
    return jnp.sum(fn(*inputs).astype(jnp.float32) * cotangent)

  return jax.grad(loss, argnums)


def run(args) -> dict:
  dtype = jnp.dtype(args.dtype)
  heads, width = args.heads, args.width
  dim = width // heads
  results, rates = [], {}  # rates[(name, mode)] = achieved FLOP/s at last size
  t_start = time.perf_counter()
  deadline = getattr(args, 'deadline', None)  # perf_counter time (accelerator_suite)
  for n in args.tokens:
    grid = int(round(math.sqrt(n)))
    if grid * grid != n:
      raise ValueError(f'token counts must be squares (a grid), got {n}')
    if deadline is not None and time.perf_counter() > deadline:
      results.append({'tokens': n, 'skipped': 'time budget spent before this size'})
      print(f'n={n}: skipped (time budget)', flush=True)
      continue
    rounds = args.rounds or (7 if n <= 4096 else 3)
    keys = jax.random.split(jax.random.key(n), 6)
    shape = (args.batch, heads, n, dim)
    q, k, v, cot = (jax.random.normal(kk, shape, jnp.float32).astype(dtype)
                    for kk in keys[:4])
    bound = 1 / math.sqrt(args.linformer_k)
    proj = [jax.random.uniform(kk, (n, args.linformer_k), jnp.float32, -bound, bound)
            for kk in keys[4:]]
    configs = _configs(grid, args.kinds, args.patterns)
    for mode in ('forward', 'forward_backward'):
      inputs = (q, k, v, *proj) + ((cot,) if mode == 'forward_backward' else ())
      calls, rows = {}, {}
      for name, kind, pattern, spec in configs:
        mask = layout = None
        row = {'tokens': n, 'grid': f'{grid}x{grid}', 'width': width, 'heads': heads,
               'batch': args.batch, 'dtype': args.dtype, 'kind': kind,
               'pattern': pattern, 'pattern_spec': spec, 'mode': mode,
               'block_size': args.block_size if pattern else None,
               'linformer_k': args.linformer_k if 'linformer' in kind else None}
        if spec is not None:
          mask = masks.bind_grid(masks.parse_pattern(spec), grid)
          layout = block_layout.block_layout(mask, n, min(args.block_size, n))
          row['tile_density'] = layout.density
          row['layout'] = layout.summary()
        fn = _attention_fn(kind, mask, args.block_size)
        if mode == 'forward_backward':
          fn = _forward_backward(fn, kind)
        # jit caches traces per function object and the schedule is chosen
        # at trace time: trace each schedule from its own wrapper.
        start = time.perf_counter()
        compiled = jax.jit(lambda *a: fn(*a)).lower(*inputs).compile()
        row['compile_s'] = time.perf_counter() - start
        if kind.startswith('pallas_'):  # cost analysis cannot see inside the kernels
          row['flops'] = None
          row['flops_method'] = 'not measured: XLA cost analysis does not see inside Pallas kernels'
        else:
          with attention_kernels.chunking(None):  # FLOPs: no loops to undercount
            row['flops'] = lowered_flops(jax.jit(lambda *a: fn(*a)).lower(*inputs))
          row['flops_method'] = 'XLA cost analysis of the lowered program, unchunked schedule'
          if 'while' not in compiled.as_text() and kind.endswith('block_sparse'):
            row['schedule_note'] = 'every group fit one chunk: no loop'
        row['schedule'] = str(attention_kernels.current_schedule())
        row['memory'] = memory_stats(compiled)
        row['memory_method'] = 'compiled.memory_analysis(): arguments + outputs + temporaries'
        peak_gb = row['memory'].get('peak_bytes', 0) / 2**30
        rate = rates.get((name, mode))
        estimate = row['flops'] / rate if rate and row['flops'] else None
        row['estimated_call_s'] = estimate
        if peak_gb > args.max_gb:
          row['skipped'] = (f'would need {peak_gb:.1f} GB (limit --max-gb={args.max_gb})')
        elif estimate is not None and estimate > args.max_call_s:
          row['skipped'] = (f'would take ~{estimate:.0f} s per call ({row["flops"] / 1e9:.0f} '
                            f'GFLOP at the {rate / 1e9:.0f} GFLOP/s it reached at the '
                            f'previous size; limit --max-call-s={args.max_call_s:g}); '
                            f'needs {peak_gb:.2f} GB')
        else:
          calls[name] = (compiled, inputs)
        rows[name] = row
        print(f'n={n} {mode:16s} {name:34s} compiled in {row["compile_s"]:.1f}s, '
              f'{(row["flops"] or 0) / 1e9:9.2f} GFLOP, peak {peak_gb * 1024:8.1f} MB'
              + (f'  SKIPPED: {row["skipped"]}' if 'skipped' in row else ''), flush=True)
      slowest = max([rows[name]['estimated_call_s'] or 0 for name in calls], default=0)
      this_rounds = rounds if slowest < 5 else max(1, min(rounds, 2))
      times = interleaved_times(calls, this_rounds, warmup=1,
                                budget_s=args.budget_s_per_group)
      dense_times = times.get('dense')
      for name, row in rows.items():
        if name in times:
          stats = throughput.summarize(times[name])
          row['time_s'] = stats
          row['rounds'] = len(times[name])
          if row['flops']:
            row['achieved_flops_per_s'] = row['flops'] / stats['median']
            rates[(name, mode)] = row['achieved_flops_per_s']
          if dense_times and name != 'dense':
            row['speedup_vs_dense'] = paired_ratio(dense_times, times[name])
          print(f'n={n} {mode:16s} {name:34s} median {stats["median"] * 1e3:10.2f} ms'
                + (f'  x{row["speedup_vs_dense"]:.1f} vs dense' if 'speedup_vs_dense' in row else ''),
                flush=True)
        results.append(row)
  return {'results': results, 'wall_s': time.perf_counter() - t_start}


def check_targets(results: list[dict], density_limit: float = 1 / 16) -> dict:
  """The issue's targets, evaluated on the results."""
  results = [r for r in results if 'mode' in r]  # not the sizes skipped whole
  by = {(r['tokens'], r['mode'], r['kind'], r['pattern']): r for r in results}
  checks = {'speedup_at_4096': [], 'memory_growth': [], 'at_16384': []}
  for r in results:
    if r['tokens'] == 4096 and r['kind'] == 'block_sparse' and r.get('tile_density', 1) <= density_limit:
      checks['speedup_at_4096'].append({
          'pattern': r['pattern'], 'mode': r['mode'], 'tile_density': r['tile_density'],
          'speedup_vs_dense': r.get('speedup_vs_dense'),
          'met_8x': (r.get('speedup_vs_dense') or 0) >= 8})
  sizes = sorted({r['tokens'] for r in results})
  for r in results:
    if r['kind'] == 'dense':
      continue
    i = sizes.index(r['tokens'])
    if i == 0:
      continue
    prev = by.get((sizes[i - 1], r['mode'], r['kind'], r['pattern']))
    if prev and prev.get('memory') and r.get('memory'):
      a, b = prev['memory']['peak_bytes'], r['memory']['peak_bytes']
      checks['memory_growth'].append({
          'kind': r['kind'], 'pattern': r['pattern'], 'mode': r['mode'],
          'tokens': [sizes[i - 1], r['tokens']], 'peak_bytes': [a, b],
          'exponent': math.log(b / a) / math.log(r['tokens'] / sizes[i - 1])})
  for r in results:
    if r['tokens'] == max(sizes):
      checks['at_16384'].append({
          'kind': r['kind'], 'pattern': r['pattern'], 'mode': r['mode'],
          'median_s': r.get('time_s', {}).get('median'),
          'peak_gb': r.get('memory', {}).get('peak_bytes', 0) / 2**30,
          'skipped': r.get('skipped')})
  return checks


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tokens', type=lambda s: [int(x) for x in s.split(',')],
                      default=[256, 1024, 4096, 16384])
  parser.add_argument('--width', type=int, default=512)
  parser.add_argument('--heads', type=int, default=1)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--block-size', type=int, default=16)
  parser.add_argument('--linformer-k', type=int, default=64)
  parser.add_argument('--kinds', type=lambda s: s.split(','), default=None,
                      help=f'comma-separated, from {",".join(KINDS)} (default: the first '
                           'four; all six on a GPU)')
  parser.add_argument('--patterns', type=lambda s: s.split(','), default=list(PATTERNS))
  parser.add_argument('--rounds', type=int, default=0,
                      help='timed rounds (0: 7 up to 4096 tokens, 3 above)')
  parser.add_argument('--max-call-s', type=float, default=30.0)
  parser.add_argument('--max-gb', type=float, default=8.0)
  parser.add_argument('--budget-s-per-group', type=float, default=60.0,
                      help='stop adding rounds to one (tokens, mode) after this long')
  parser.add_argument('--out', default=None,
                      help='default: benchmarks/results/attention_<backend>.json')
  args = parser.parse_args()
  args.kinds = args.kinds or default_kinds()
  args.out = args.out or str(ROOT / f'benchmarks/results/attention_{jax.default_backend()}.json')
  machine = machine_info()
  print(json.dumps({k: machine[k] for k in ('cpu_model', 'logical_cpus', 'load_average_at_start')}))
  outcome = run(args)
  machine['load_average_at_end'] = os.getloadavg()
  write_json(args.out, {
      'benchmark': 'attention',
      'command': command_line(),
      'machine': machine,
      'settings': {k: v for k, v in vars(args).items() if k != 'out'},
      'patterns': {p: PATTERNS[p]('W') for p in args.patterns},
      'method': __doc__,
      'wall_s': outcome['wall_s'],
      'targets': check_targets(outcome['results']),
      'results': outcome['results'],
  })


if __name__ == '__main__':
  main()
