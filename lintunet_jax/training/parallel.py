"""Devices, meshes and global arrays for data-parallel training and evaluation.

The training and evaluation steps are per-device functions (pmap style)
run with `jax.shard_map` under `jax.jit` over a one-axis mesh named
`DATA_AXIS` that spans every device of every process:

  * parameters, BatchNorm statistics and optimizer state are replicated:
    `PartitionSpec()` (`replicated_sharding(mesh)`);
  * batches are split along their first axis: `PartitionSpec('data')`
    (`batch_sharding(mesh)`); each process feeds only its own rows
    (`shard_batch`), which become one global `jax.Array`.

Multi-process start-up (jax.distributed) is in `distributed.py`.

Usage (what `train_lib` and `eval.py` do):

  mesh = parallel.create_mesh()
  parallel.check_batch_size(config.batch_size, mesh=mesh)
  state = parallel.replicate(mesh, state)            # host values, same on every process
  batch = parallel.shard_batch(mesh, local_batch)    # this process's rows
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


class BatchSizeError(ValueError):
  """A batch size that does not split over the devices/processes."""


def create_mesh(devices: Sequence[jax.Device] | None = None,
                axis_name: str = DATA_AXIS) -> Mesh:
  """A one-axis mesh over `devices` (default: every device of every process).

  The axis is `AxisType.Auto` (jax.make_mesh would default to Explicit in
  JAX 0.10, which changes how jit propagates shardings).
  """
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (axis_name,),
              axis_types=(jax.sharding.AxisType.Auto,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(mesh.axis_names[0]))


def valid_batch_sizes(num_devices: int, num_processes: int = 1,
                      up_to: int = 256) -> list[int]:
  """Global batch sizes that split evenly over devices (and processes)."""
  step = int(np.lcm(num_devices, num_processes))
  return list(range(step, up_to + 1, step))


def check_batch_size(global_batch_size: int, *, mesh: Mesh | None = None,
                     num_devices: int | None = None,
                     num_processes: int | None = None,
                     name: str = 'batch_size') -> int:
  """Checks a global batch splits over the devices; returns the per-process size.

  Raises BatchSizeError (a ValueError) naming the sizes that work (multiples of the device
  count) when `global_batch_size` does not divide evenly.
  """
  if num_devices is None:
    num_devices = mesh.devices.size if mesh is not None else jax.device_count()
  if num_processes is None:
    num_processes = jax.process_count()
  ok = global_batch_size > 0 and global_batch_size % num_devices == 0 and (
      global_batch_size % num_processes == 0)
  if not ok:
    sizes = valid_batch_sizes(num_devices, num_processes,
                              up_to=max(8 * num_devices, 2 * global_batch_size))
    shown = ', '.join(map(str, sizes[:8])) + ', ...'
    raise BatchSizeError(
        f'{name}={global_batch_size} (the global batch, over all devices) does '
        f'not split evenly over {num_devices} devices'
        + (f' in {num_processes} processes' if num_processes > 1 else '')
        + f': use a multiple of {int(np.lcm(num_devices, num_processes))}, '
        f'e.g. {shown} (set --config.{name}=N)')
  return global_batch_size // num_processes


def resolve_batch_sizes(config, num_devices: int | None = None):
  """The config with its global batch sizes fixed from the per-device ones.

  Accelerator recipes say how many images one chip takes
  (`per_device_batch_size`, `per_device_eval_batch_size`); the global
  `batch_size` / `eval_batch_size` the rest of the code reads are that
  times the device count of this run. Returns a copy (the flag-parsed
  config is locked); with no per-device field set, the config unchanged.
  """
  if num_devices is None:
    num_devices = jax.device_count()
  pairs = (('per_device_batch_size', 'batch_size'),
           ('per_device_eval_batch_size', 'eval_batch_size'))
  if all(config.get(per) is None for per, _ in pairs):
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for per, total in pairs:
      per_device = config.get(per)
      if per_device is None:
        continue
      if per_device < 1:
        raise BatchSizeError(f'config.{per}={per_device} must be >= 1')
      config[total] = per_device * num_devices
      config[per] = None  # resolved: a saved config.json restores as is
  logging.info('global batch %d (%d devices), eval batch %d',
               config.batch_size, num_devices, config.eval_batch_size)
  return config


def describe_platform() -> dict[str, Any]:
  """What this process runs on, for the start-up log and reports."""
  devices = jax.devices()
  return {'platform': devices[0].platform,
          'device_kind': devices[0].device_kind,
          'device_count': len(devices),
          'local_device_count': jax.local_device_count(),
          'process_index': jax.process_index(),
          'process_count': jax.process_count()}


class NoAcceleratorError(RuntimeError):
  """JAX fell back to the CPU where a GPU or TPU was required."""


def format_platform(info: dict[str, Any]) -> str:
  """One line for the start-up log of train.py, eval.py and predict.py."""
  return (f'JAX {jax.__version__} on {info["platform"]}: {info["device_count"]} x '
          f'{info["device_kind"]} ({info["local_device_count"]} local) in '
          f'{info["process_count"]} process(es)')


def check_accelerator(config=None, *, required: bool | None = None) -> dict[str, Any]:
  """Logs the platform; raises when an accelerator is required but absent.

  required: None reads `config.require_accelerator` (training recipes set
  it); eval.py and predict.py pass their own choice.
  """
  info = describe_platform()
  logging.info('%s', format_platform(info))
  if required is None:
    required = bool(config is not None and config.get('require_accelerator', False))
  if required and info['platform'] == 'cpu':
    raise NoAcceleratorError(
        'an accelerator is required (config.require_accelerator, or '
        'eval.py/predict.py --require_accelerator) but JAX found only the CPU '
        f'({jax.__version__}, backends tried: JAX_PLATFORMS='
        f'{os.environ.get("JAX_PLATFORMS", "") or "auto"}). Install the '
        'accelerator build of JAX (README: "Installing for GPUs and TPUs": '
        'pip install -r requirements-gpu.txt or requirements-tpu.txt), or run '
        'a CPU recipe / pass --config.require_accelerator=False.')
  return info


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Host values (identical on every process) -> replicated global arrays.

  Works on one or many processes: every device gets the whole value.
  Leaves that already are `jax.Array`s with the replicated sharding are
  returned as they are.
  """
  sharding = replicated_sharding(mesh)

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    if isinstance(x, jax.Array) and jax.process_count() == 1:
      return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(put, tree)


def shard_batch(mesh: Mesh, local_batch: Mapping[str, Any]) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded along `data`.

  `local_batch`: dict of numpy arrays whose first axis is this process's
  share of the global batch (global batch / process count rows, in
  process-index order). Returns global `jax.Array`s of the global batch
  size, split over the mesh's devices (`jax.make_array_from_process_local_data`).
  Non-array entries (e.g. strings) are dropped.
  """
  sharding = batch_sharding(mesh)
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    if value.dtype.kind not in 'biuf':
      continue
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def to_host(tree: Any) -> Any:
  """Replicated (or fully addressable) global arrays -> numpy, on any process."""

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)

  return jax.tree.map(get, tree)
