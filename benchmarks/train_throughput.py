"""Training throughput (images/s) of LinTUNet and the U-Net at 256x256.

  python benchmarks/train_throughput.py                       # this machine's default
  python benchmarks/train_throughput.py --batch_size 32 --dtype bfloat16 --runs 20

Times the real data-parallel training step of `lintunet_jax.training.loop`
(forward, backward, pmean, clipping, Adam update; `jax.shard_map` over all
local devices) on the seed's recipe (configs/lintunet.py, configs/unet.py:
width 64, 256x256 grayscale), one model after the other with the same
batch. Each step is compiled first (compile time reported, never timed),
warmed up, then timed call by call with `jax.block_until_ready`
(`lintunet_jax.evaluation.throughput.benchmark`, donated state carried over); images/s
is global batch / median step time. Data: synthetic MRI slices (values do
not change the work). The defaults depend on the platform: on CPU a step at
256x256 takes seconds, so batch 2 and 3 timed steps; on accelerators batch
32 and 20 steps.

Writes benchmarks/results/train_throughput_<platform>.json with the device,
dtype, batch size, the command and the machine's load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / 'benchmarks'):
  if str(path) not in sys.path:
    sys.path.insert(0, str(path))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from attention_benchmark import machine_info  # noqa: E402  (shared helper)
from configs import lintunet as lintunet_config  # noqa: E402
from configs import unet as unet_config  # noqa: E402
from lintunet_jax import models  # noqa: E402
from lintunet_jax.training import optim  # noqa: E402
from lintunet_jax.training import parallel  # noqa: E402
from lintunet_jax.evaluation import throughput  # noqa: E402
from lintunet_jax.training import loop as train_lib  # noqa: E402
from lintunet_jax.training import state as train_state_lib  # noqa: E402
from lintunet_jax.data.datasets import synthetic_mri  # noqa: E402


def _load() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def measure(name: str, config, *, batch_size: int, warmup: int, runs: int) -> dict:
  mesh = parallel.create_mesh(jax.local_devices())
  parallel.check_batch_size(batch_size, mesh=mesh)
  model = train_state_lib.init_model(config.model, seed=0, bn_axis_name=parallel.DATA_AXIS)
  num_params = models.count_parameters(model)
  model_def, variables = train_state_lib.split_model(model)
  schedule = optim.create_learning_rate_schedule(config, 100, 4000)
  tx = optim.create_optimizer(config, schedule)
  state = parallel.replicate(mesh, jax.device_get(
      train_state_lib.create_train_state(variables, tx, seed=0)))
  size = config.dataset.image_size
  images, masks = synthetic_mri.generate(batch_size, size, seed=(0, 9))
  batch = parallel.shard_batch(mesh, {
      'image': images[..., None].astype(np.float32) / 255.0,
      'mask': (masks > 0).astype(np.int32)})
  step = train_lib.make_train_step(model_def, tx, mesh, loss=config.loss)
  load_before = _load()
  start = time.perf_counter()
  result = throughput.benchmark(step, state, batch, items=batch_size, warmup=warmup,
                                runs=runs, carry=True)
  return {
      'model': name,
      'parameters': num_params,
      'image_size': size,
      'width': config.model.width,
      'attention': config.model.attention.kind if name == 'lintunet' else None,
      'dtype': config.model.dtype,
      'global_batch_size': batch_size,
      'devices': len(mesh.devices.flat),
      'images_per_s': round(batch_size / result['latency_s']['median'], 3),
      'step_time_s': result['latency_s'],
      'compile_s': round(result['compile_s'], 2),
      'wall_s': round(time.perf_counter() - start, 2),
      'flops_per_step': result.get('flops_per_batch'),
      'load_average_before': load_before,
      'load_average_after': _load(),
      'benchmark': {k: v for k, v in result.items()
                    if k not in ('latency_s', 'compile_s')},
  }


def main() -> None:
  platform = jax.devices()[0].platform
  on_cpu = platform == 'cpu'
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='lintunet,unet')
  parser.add_argument('--batch_size', type=int, default=2 if on_cpu else 32)
  parser.add_argument('--image_size', type=int, default=256)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--warmup', type=int, default=1 if on_cpu else 3)
  parser.add_argument('--runs', type=int, default=3 if on_cpu else 20)
  parser.add_argument('--output', default=str(
      ROOT / 'benchmarks' / 'results' / f'train_throughput_{platform}.json'))
  args = parser.parse_args()

  results = []
  for name in args.models.split(','):
    config = (lintunet_config if name == 'lintunet' else unet_config).get_config()
    config.dataset.image_size = args.image_size
    config.model.attention.seq_len = (args.image_size // 16) ** 2
    config.model.dtype = args.dtype
    print(f'{name}: compiling and timing a train step at {args.image_size}x'
          f'{args.image_size}, batch {args.batch_size}, {args.dtype} ...', flush=True)
    row = measure(name, config, batch_size=args.batch_size, warmup=args.warmup,
                  runs=args.runs)
    print(f'  {row["images_per_s"]:.2f} images/s (median step '
          f'{row["step_time_s"]["median"]:.3f} s; compile {row["compile_s"]:.1f} s)',
          flush=True)
    results.append(row)
  payload = {
      'what': 'training throughput: one data-parallel train step (forward, backward, '
              'pmean, global-norm clipping, Adam) of the seed recipe per model',
      'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'device': throughput.device_info(),
      'machine': machine_info(),
      'note': ('wall-clock numbers on a shared CPU machine move with other processes; '
               'see load_average_*'),
      'results': results,
  }
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  with open(args.output, 'w') as f:
    json.dump(payload, f, indent=2)
    f.write('\n')
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
