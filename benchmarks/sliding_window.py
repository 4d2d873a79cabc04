"""Sliding window vs resizing down: time and memory on an image 4x the training size.

  python benchmarks/sliding_window.py                          # CPU: width 8, S=64, 256x256
  python benchmarks/sliding_window.py --width 32 --size 256    # on a GPU: 1024x1024
  python benchmarks/sliding_window.py --workdir runs/fold0     # a trained model
  python benchmarks/sliding_window.py --quick --out /tmp/s.json  # seconds (a test)

A model trained at S x S (LinTUNet, `linformer_block_sparse` by default:
its Linformer projections only take S x S inputs) predicts one image of
(scale * S) x (scale * S) pixels three ways, through the code eval.py and
predict.py run:

  resize        the image resized down to S x S (bilinear), one forward,
                logits resized back up (bilinear): the pre-window path;
  window        `sliding_window.make_predict_fn`, tiles of S at overlap
                0.5 (nnU-Net's step), Gaussian blending, no TTA;
  window+flips  the same with flips TTA (4x the tiles in each call).

Each is jit-compiled once; time is the median over `--rounds` interleaved
rounds after `--warmup` calls (`block_until_ready`). Memory is the
compiled program's `memory_analysis()` temp + output bytes (the parameters
are arguments, the same for all three), and on a GPU also the device's
`peak_bytes_in_use` after the variant first ran (a running maximum over
the process: variants run in increasing order of expected memory, so each
value is that variant's peak or an earlier one's). Writes
benchmarks/results/sliding_window_<backend>.json and prints a table.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / 'benchmarks'):
  if str(path) not in sys.path:
    sys.path.insert(0, str(path))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from attention_benchmark import (command_line, interleaved_times,  # noqa: E402
                                 machine_info, write_json)
from configs import lintunet as lintunet_config  # noqa: E402
from lintunet_jax import models  # noqa: E402
from lintunet_jax.evaluation import sliding_window as sw  # noqa: E402
from lintunet_jax.training import checkpointing  # noqa: E402

QUICK = {'width': 4, 'size': 32, 'scale': 2, 'rounds': 2, 'warmup': 1,
         'tile_batch_size': 4}


def model_and_config(args):
  """(model, config): restored from --workdir, else random at --size."""
  if args.workdir:
    config, model, _ = checkpointing.restore_model(args.workdir)
    return model, config
  config = lintunet_config.get_config('quick')
  size = args.size
  attention = config.model.attention
  attention.kind = args.kind
  attention.seq_len = (size // models.DOWNSAMPLING) ** 2
  attention.k = min(8, attention.seq_len)
  attention.block_size = min(4, size // models.DOWNSAMPLING)
  config.model.width = args.width
  config.dataset.image_size = size
  config.eval_batch_size = args.tile_batch_size
  return models.create_model(config.model, seed=0), config


def variants(model, config, args):
  """name -> (jitted fn of the image, settings or None), in order of
  expected memory."""
  size = sw.inference_settings(config).tile_size
  plain = sw.make_predict_fn([model], sw.inference_settings(
      config, sliding_window=False, tile_batch_size=args.tile_batch_size))

  def resize(images):
    batch, height, width, channels = images.shape
    small = jax.image.resize(images, (batch, size, size, channels), 'linear')
    logits = plain(small)
    return jax.image.resize(logits, (batch, height, width, logits.shape[-1]),
                            'linear')

  out = {'resize': (jax.jit(resize), None)}
  for name, tta in (('window', 'none'), ('window+flips', 'flips')):
    settings = sw.inference_settings(
        config, sliding_window=True, overlap=0.5, tta=tta,
        tile_batch_size=args.tile_batch_size)
    out[name] = (jax.jit(sw.make_predict_fn([model], settings)), settings)
  return out


def compiled_memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  temp, output = int(m.temp_size_in_bytes), int(m.output_size_in_bytes)
  return {'temp_bytes': temp, 'output_bytes': output,
          'temp_plus_output_bytes': temp + output}


def device_peak() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return int(peak) if peak is not None else None


def run(args) -> dict:
  model, config = model_and_config(args)
  size = sw.inference_settings(config).tile_size
  edge = args.scale * size
  image = jnp.asarray(np.random.default_rng(0).uniform(
      size=(1, edge, edge, config.model.in_channels)).astype(np.float32))
  calls = variants(model, config, args)
  rows, compiled = [], {}
  for name, (fn, settings) in calls.items():
    compiled[name] = fn.lower(image).compile()  # compiled once, timed below
    row = {'variant': name, 'memory': compiled_memory(compiled[name])}
    jax.block_until_ready(compiled[name](image))
    row['device_peak_bytes_in_use'] = device_peak()
    if settings is not None:
      row['tiles'] = len(sw.tile_positions(edge, edge, size, settings.overlap))
      row['forward_passes'] = row['tiles'] * (4 if settings.tta == 'flips' else 1)
    else:
      row['tiles'], row['forward_passes'] = 0, 1
    rows.append(row)
  times = interleaved_times({n: (fn, (image,)) for n, fn in compiled.items()},
                            rounds=args.rounds, warmup=args.warmup)
  base = float(np.median(times['resize']))
  for row in rows:
    seconds = times[row['variant']]
    row['times_s'] = [float(t) for t in seconds]
    row['median_s'] = float(np.median(seconds))
    row['time_vs_resize'] = row['median_s'] / base
  return {
      'benchmark': 'sliding_window', 'command': command_line(),
      'machine': machine_info(),
      'settings': {'model': config.model.name,
                   'attention_kind': (config.model.attention.kind
                                      if config.model.name == 'lintunet' else None),
                   'width': config.model.width, 'training_size': size,
                   'image_size': edge, 'scale': args.scale, 'overlap': 0.5,
                   'tile_batch_size': args.tile_batch_size,
                   'rounds': args.rounds, 'warmup': args.warmup,
                   'trained_workdir': args.workdir, 'quick': args.quick,
                   'backend': jax.default_backend(),
                   'device': jax.devices()[0].device_kind},
      'method': ('median of interleaved rounds after warm-up, '
                 'block_until_ready; memory: compiled memory_analysis() '
                 'temp + output bytes; device_peak_bytes_in_use: running '
                 'maximum of the device (GPU) after the variant first ran'),
      'rows': rows}


def format_table(result: dict) -> str:
  s = result['settings']
  lines = [f"{s['model']} width {s['width']}, trained at {s['training_size']}px, "
           f"image {s['image_size']}x{s['image_size']} on {s['device']}",
           f"{'variant':<14} {'passes':>6} {'median ms':>10} {'x resize':>9} "
           f"{'temp+out MiB':>13} {'device peak MiB':>16}"]
  for row in result['rows']:
    memory = row['memory'].get('temp_plus_output_bytes')
    peak = row['device_peak_bytes_in_use']
    lines.append(
        f"{row['variant']:<14} {row['forward_passes']:>6} "
        f"{row['median_s'] * 1e3:>10.2f} {row['time_vs_resize']:>9.2f} "
        f"{'n/a' if memory is None else f'{memory / 2**20:.2f}':>13} "
        f"{'n/a' if peak is None else f'{peak / 2**20:.1f}':>16}")
  return '\n'.join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--width', type=int, default=8)
  parser.add_argument('--size', type=int, default=64, help='training size S')
  parser.add_argument('--scale', type=int, default=4, help='image edge / S')
  parser.add_argument('--kind', default='linformer_block_sparse')
  parser.add_argument('--tile-batch-size', dest='tile_batch_size', type=int, default=8)
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--workdir', default=None, help='a trained workdir')
  parser.add_argument('--quick', action='store_true',
                      help=f'tiny sizes for a test: {QUICK}')
  parser.add_argument('--out', default=None)
  args = parser.parse_args(argv)
  if args.quick:
    for key, value in QUICK.items():
      setattr(args, key, value)
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  result = run(args)
  out = args.out or str(ROOT / 'benchmarks' / 'results' /
                        f'sliding_window_{jax.default_backend()}.json')
  write_json(out, result)
  print(format_table(result))
  return result


if __name__ == '__main__':
  main()
