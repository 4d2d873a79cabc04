"""How fast a jit-compiled function runs, measured so the numbers mean something.

The seed timed Python calls without waiting for the accelerator, so it
measured how fast work was *queued*. Here every measurement:

* compiles first (`jax.jit(fn).lower(*args).compile()`), and reports the
  compile time separately, never inside a timing;
* runs `warmup` untimed calls (first-call allocations, autotuning);
* times each of `runs` calls with `time.perf_counter()` around the call *and*
  `jax.block_until_ready` on its outputs, so a timing covers the device work;
* reports the median and the spread (min, p10, p90, max, std) of those
  per-call latencies, images/s from the median, the FLOPs XLA's cost analysis
  counts for one call, and the achieved FLOP/s (FLOPs / median latency),
  next to the device's peak where it is known.

Library use (also for benchmarks):

  result = throughput.benchmark(jax.jit(f), *args, items=batch_size)
  result = throughput.benchmark_forward(model, batch_size=8,
                                        image_shape=(256, 256, 1))
  report = throughput.inference_throughput(model, config, batch_sizes=(1, 8, 32))

`benchmark` times any jittable function (a train step included) as long as
it does not donate its arguments: the same inputs are passed on every call.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lintunet_jax.data import pipeline as input_pipeline

# Dense peak FLOP/s from vendor datasheets, per (device-kind substring, compute
# dtype). For float32 on Ampere+/Hopper GPUs XLA's default matmul precision
# uses TF32 tensor cores (see JAX's "Matmul precision" docs), so the TF32 peak
# is the relevant ceiling; TPUs run float32 matmuls as bfloat16 passes by
# default. First matching substring wins (more specific names first).
PEAK_FLOPS: tuple[tuple[str, dict[str, float], str], ...] = (
    ('H200', {'bfloat16': 989e12, 'float32': 494e12},
     'NVIDIA H200 datasheet, dense BF16 / TF32 tensor core'),
    ('H100 PCIe', {'bfloat16': 756e12, 'float32': 378e12},
     'NVIDIA H100 PCIe datasheet, dense BF16 / TF32 tensor core'),
    ('H100', {'bfloat16': 989e12, 'float32': 494e12},
     'NVIDIA H100 SXM datasheet, dense BF16 / TF32 tensor core'),
    ('A100', {'bfloat16': 312e12, 'float32': 156e12},
     'NVIDIA A100 datasheet, dense BF16 / TF32 tensor core'),
    ('TPU v6', {'bfloat16': 918e12, 'float32': 918e12},
     'Cloud TPU v6e peak BF16 per chip'),
    ('TPU v5p', {'bfloat16': 459e12, 'float32': 459e12},
     'Cloud TPU v5p peak BF16 per chip'),
    ('TPU v5 lite', {'bfloat16': 197e12, 'float32': 197e12},
     'Cloud TPU v5e peak BF16 per chip'),
    ('TPU v5e', {'bfloat16': 197e12, 'float32': 197e12},
     'Cloud TPU v5e peak BF16 per chip'),
    ('TPU v4', {'bfloat16': 275e12, 'float32': 275e12},
     'Cloud TPU v4 peak BF16 per chip'),
)


def device_info(devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """What ran the measurement: platform, device kind and count."""
  devices = list(devices) if devices is not None else jax.local_devices()
  return {
      'platform': devices[0].platform,
      'device_kind': devices[0].device_kind,
      'device_count': len(devices),
      'process_count': jax.process_count(),
      'jax_version': jax.__version__,
  }


def peak_flops_per_s(device_kind: str, dtype: str,
                     device_count: int = 1) -> tuple[float | None, str | None]:
  """(peak FLOP/s over `device_count` devices, its source), or (None, None)."""
  for needle, peaks, source in PEAK_FLOPS:
    if needle.lower() in device_kind.lower() and dtype in peaks:
      return peaks[dtype] * device_count, source
  return None, None


def cost_analysis_flops(compiled: Any) -> float | None:
  """FLOPs that XLA's cost analysis counts for one call of `compiled`.

  `Compiled.cost_analysis()` returns a dict in current JAX (a list with one
  dict per program in older versions) and may be None or raise on backends
  that do not implement it; all of those give None here rather than failing
  a measurement.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None
  flops = cost.get('flops')
  if flops is None or not np.isfinite(flops) or flops < 0:
    return None
  return float(flops)


def summarize(samples: Sequence[float]) -> dict[str, float | int]:
  """Median and spread of a list of measurements (seconds or anything)."""
  if not samples:
    raise ValueError('no samples to summarize')
  values = np.asarray(samples, np.float64)
  return {
      'median': float(np.median(values)),
      'mean': float(values.mean()),
      'min': float(values.min()),
      'p10': float(np.percentile(values, 10)),
      'p90': float(np.percentile(values, 90)),
      'max': float(values.max()),
      'std': float(values.std(ddof=1)) if values.size > 1 else 0.0,
      'count': int(values.size),
  }


def time_calls(fn: Callable[..., Any], args: Sequence[Any], *, warmup: int = 3,
               runs: int = 20, carry: bool = False,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
  """Per-call wall times (s) of `fn(*args)`, each waiting for the outputs.

  `warmup` calls run first and are not timed; each of the `runs` timed calls
  ends only when `jax.block_until_ready` returns on its outputs. With
  `carry`, `fn` returns `(new_first_arg, ...)` and each call gets the
  previous call's first output as its first argument (a train step that
  donates its state).
  """
  if runs < 1:
    raise ValueError(f'runs must be >= 1, got {runs}')
  args = tuple(args)
  for _ in range(max(warmup, 0)):
    out = jax.block_until_ready(fn(*args))
    if carry:
      args = (out[0], *args[1:])
  times = []
  for _ in range(runs):
    start = clock()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append(clock() - start)
    if carry:
      args = (out[0], *args[1:])
  return times


def benchmark(fn: Callable[..., Any], *args: Any, items: int = 1,
              warmup: int = 3, runs: int = 20, carry: bool = False,
              peak_flops: float | None = None,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
  """Compiles `fn` for `args`, then times it; `items` = images per call.

  `fn` may be a plain function or already `jax.jit`-wrapped. It must not
  donate its arguments, unless `carry` (see `time_calls`): then only the
  first, which each call replaces by its first output. Returns a JSON-ready dict: compile time, latency
  statistics (s), items/s (median, and the range implied by min/max
  latency), FLOPs per call and per item from XLA's cost analysis, achieved
  FLOP/s at the median latency, and the fraction of `peak_flops` when given.
  """
  jitted = fn if hasattr(fn, 'lower') else jax.jit(fn)
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - start
  flops = cost_analysis_flops(compiled)
  latency = summarize(time_calls(compiled, args, warmup=warmup, runs=runs,
                                 carry=carry, clock=clock))
  median = latency['median']
  achieved = flops / median if flops is not None and median > 0 else None
  return {
      'batch_size': items,
      'compile_s': compile_s,
      'warmup_runs': warmup,
      'timed_runs': runs,
      'latency_s': latency,
      'images_per_s': {
          'median': items / median if median > 0 else None,
          'min': items / latency['max'] if latency['max'] > 0 else None,
          'max': items / latency['min'] if latency['min'] > 0 else None,
      },
      'flops_per_batch': flops,
      'flops_per_image': flops / items if flops is not None else None,
      'achieved_flops_per_s': achieved,
      'fraction_of_peak': (achieved / peak_flops
                           if achieved is not None and peak_flops else None),
  }


def _eval_forward(model: nnx.Module):
  """(jittable forward(state, images) -> logits, state) in inference mode."""
  graphdef, state = nnx.split(model)

  def forward(state, images):
    module = nnx.merge(graphdef, state)
    module.eval()  # BatchNorm running averages, dropout off
    return module(images)

  return forward, state


def benchmark_forward(model: nnx.Module, *, batch_size: int,
                      image_shape: tuple[int, int, int], warmup: int = 3,
                      runs: int = 20, seed: int = 0,
                      input_sharding: jax.sharding.Sharding | None = None,
                      state_sharding: jax.sharding.Sharding | None = None,
                      peak_flops: float | None = None,
                      clock: Callable[[], float] = time.perf_counter
                      ) -> dict[str, Any]:
  """Times the jit-compiled inference forward pass on random float32 images.

  The parameters are an argument of the compiled function (not constants
  folded into it), as in evaluation. With `input_sharding` (e.g. the data
  axis of a mesh) the batch is split over devices and the state placed with
  `state_sharding` (replicated). Inputs are random normal, never all zeros.
  """
  forward, state = _eval_forward(model)
  images = jax.random.normal(jax.random.key(seed), (batch_size, *image_shape),
                             jnp.float32)
  if input_sharding is not None:
    images = jax.device_put(images, input_sharding)
  if state_sharding is not None:
    state = jax.device_put(state, state_sharding)
  return benchmark(forward, state, images, items=batch_size, warmup=warmup,
                   runs=runs, peak_flops=peak_flops, clock=clock)


def inference_throughput(model: nnx.Module, config, *,
                         batch_sizes: Sequence[int] | None = None,
                         warmup: int = 3, runs: int = 20,
                         mesh: jax.sharding.Mesh | None = None,
                         data_axis: str | None = None,
                         peak_flops: float | None = None,
                         clock: Callable[[], float] = time.perf_counter
                         ) -> dict[str, Any]:
  """The report's `throughput` object: forward timings at several batch sizes.

  Default batch sizes are 1, 8 and `config.eval_batch_size` (deduplicated).
  With a `mesh`, a batch divisible by the mesh's size along `data_axis` (its
  first axis by default) is split over its devices; other batches (e.g. 1)
  run on one device, and each entry says how many devices it used.
  `peak_flops` (FLOP/s of ONE device) overrides the built-in datasheet
  table; each entry's peak is it times the devices that entry used.
  """
  size = input_pipeline.model_input_size(config)
  image_shape = (size, size, config.model.in_channels)
  if batch_sizes is None:
    batch_sizes = (1, 8, config.eval_batch_size)
  batch_sizes = list(dict.fromkeys(int(b) for b in batch_sizes))
  if any(b < 1 for b in batch_sizes):
    raise ValueError(f'batch sizes must be >= 1, got {batch_sizes}')
  if mesh is not None and jax.process_count() > 1:
    # Inputs here are made on the host; time this process's devices only.
    mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), mesh.axis_names)
  devices = list(mesh.devices.flat) if mesh is not None else jax.local_devices()[:1]
  info = device_info(devices)
  dtype = config.model.dtype
  results = []
  for batch_size in batch_sizes:
    input_sharding = state_sharding = None
    used = 1
    if mesh is not None:
      axis = data_axis or mesh.axis_names[0]
      n = mesh.shape[axis]
      if n > 1 and batch_size % n == 0:
        spec = jax.sharding.PartitionSpec(axis)
        input_sharding = jax.sharding.NamedSharding(mesh, spec)
        state_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        used = n
    if peak_flops is not None:
      peak, source = peak_flops * used, 'given by the caller (per device)'
    else:
      peak, source = peak_flops_per_s(info['device_kind'], dtype, used)
    entry = benchmark_forward(model, batch_size=batch_size,
                              image_shape=image_shape, warmup=warmup, runs=runs,
                              input_sharding=input_sharding,
                              state_sharding=state_sharding, peak_flops=peak,
                              clock=clock)
    entry['devices_used'] = used
    entry['peak_flops_per_s'] = peak
    entry['peak_source'] = source
    results.append(entry)
  return {
      'kind': 'inference_forward',
      **info,
      'dtype': dtype,
      'param_dtype': 'float32',
      'input_dtype': 'float32',
      'input_shape': list(image_shape),
      'method': ('jax.jit(forward).lower().compile(); compile excluded; '
                 f'{warmup} warm-up calls; {runs} timed calls, each ending '
                 'with jax.block_until_ready on the logits; median and '
                 'spread of per-call latency'),
      'batches': results,
  }


def train_step_throughput(config, *, mesh: jax.sharding.Mesh,
                          batch_size: int | None = None, warmup: int = 2,
                          runs: int = 10, seed: int = 0,
                          peak_flops: float | None = None,
                          clock: Callable[[], float] = time.perf_counter
                          ) -> dict[str, Any]:
  """Times `train_lib.make_train_step` (forward, backward, optimizer update).

  A fresh model and optimizer of `config` (weights do not change the cost),
  the global batch `batch_size` (default `config.batch_size`) of random
  images and random 0/1 masks sharded over `mesh`, and the donated train
  state threaded from call to call as in training. `peak_flops` is per
  device, as in `inference_throughput`.
  """
  # Imported here: the forward-pass timers above need none of training.
  from lintunet_jax import models  # pylint: disable=import-outside-toplevel
  from lintunet_jax.training import optim, parallel, loop as train_lib  # pylint: disable=import-outside-toplevel
  from lintunet_jax.training import state as train_state_lib  # pylint: disable=import-outside-toplevel
  batch_size = int(batch_size or config.batch_size)
  parallel.check_batch_size(batch_size, mesh=mesh)
  model = models.create_model(config.model, seed=seed,
                              bn_axis_name=mesh.axis_names[0])
  model_def, variables = train_state_lib.split_model(model)
  optimizer = optim.create_optimizer(
      config, optim.create_learning_rate_schedule(config, 100, 1000))
  state = parallel.replicate(mesh, jax.device_get(
      train_state_lib.create_train_state(variables, optimizer, seed=seed)))
  step = train_lib.make_train_step(model_def, optimizer, mesh, loss=config.loss)
  size = input_pipeline.model_input_size(config)
  rng = np.random.default_rng([seed, jax.process_index()])
  local = batch_size // jax.process_count()  # this process's rows
  batch = parallel.shard_batch(mesh, {
      'image': rng.normal(size=(local, size, size, config.model.in_channels)
                          ).astype(np.float32),
      'mask': rng.integers(0, max(2, config.model.num_classes),
                           size=(local, size, size)).astype(np.int32),
  })
  devices = list(mesh.devices.flat)
  info = device_info(devices)
  if peak_flops is not None:
    peak, source = peak_flops * len(devices), 'given by the caller (per device)'
  else:
    peak, source = peak_flops_per_s(info['device_kind'], config.model.dtype,
                                    len(devices))
  entry = benchmark(step, state, batch, items=batch_size, warmup=warmup,
                    runs=runs, carry=True, peak_flops=peak, clock=clock)
  entry.update(devices_used=len(devices), peak_flops_per_s=peak,
               peak_source=source)
  return {
      'kind': 'train_step',
      **info,
      'dtype': config.model.dtype,
      'input_shape': [size, size, config.model.in_channels],
      'loss': config.loss,
      'optimizer': config.optimizer,
      'method': ('train_lib.make_train_step compiled; compile excluded; '
                 f'{warmup} warm-up steps; {runs} timed steps, each ending '
                 'with jax.block_until_ready on the new state and metrics; '
                 'state donated and threaded from step to step'),
      'batches': [entry],
  }


def headline(throughput: dict[str, Any]) -> dict[str, Any] | None:
  """The entry with the largest batch (the config's), for one-number tables."""
  batches = throughput.get('batches') if throughput else None
  if not batches:
    return None
  return max(batches, key=lambda b: b['batch_size'])


def format_throughput_table(throughput: dict[str, Any]) -> str:
  """Human-readable lines: one per batch size."""
  kind = 'Train step' if throughput.get('kind') == 'train_step' else 'Inference'
  lines = [f"{kind} throughput ({throughput['device_kind']} x{throughput['device_count']}, "
           f"{throughput['platform']}, dtype {throughput['dtype']}, input "
           f"{'x'.join(map(str, throughput['input_shape']))}):",
           f"  {'batch':>5}  {'images/s':>10}  {'latency ms (median [p10, p90])':>32}"
           f"  {'GFLOP/img':>9}  {'TFLOP/s':>8}  {'% peak':>6}"]
  for b in throughput['batches']:
    lat = b['latency_s']
    gflop = (f"{b['flops_per_image'] / 1e9:.4g}"
             if b['flops_per_image'] is not None else 'n/a')
    tflops = (f"{b['achieved_flops_per_s'] / 1e12:.4g}"
              if b['achieved_flops_per_s'] is not None else 'n/a')
    frac = (f"{100 * b['fraction_of_peak']:.1f}"
            if b.get('fraction_of_peak') is not None else 'n/a')
    lat_text = (f"{lat['median'] * 1e3:.2f} [{lat['p10'] * 1e3:.2f}, "
                f"{lat['p90'] * 1e3:.2f}]")
    lines.append(f"  {b['batch_size']:>5}  {b['images_per_s']['median']:>10.1f}  "
                 f"{lat_text:>32}  {gflop:>9}  {tflops:>8}  {frac:>6}")
  return '\n'.join(lines)
