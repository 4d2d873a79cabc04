"""Several processes, one run: start-up, shared storage checks, barriers.

Multi-host JAX runs the same program once per host (Cloud TPU VM workers,
GPU nodes) or once per GPU (SLURM, Open MPI). Before anything touches a
device, every process must join the others with `jax.distributed.initialize()`;
a process that forgets trains alone on its own devices, silently, with the
wrong global batch. So the start-up here is automatic and checked:

  maybe_initialize_distributed(config)
      config.distributed None (default): initialise when a launcher that
      JAX can read started several processes (`detect_launcher`): the
      JAX_COORDINATOR_ADDRESS variables, SLURM (srun), Open MPI (mpirun),
      a TPU worker list, or any Cloud TPU VM (JAX reads the worker list
      from the VM's metadata). True: always; False: never. Then checks
      that JAX runs as many processes as the launcher started.
  check_shared_workdir(workdir)
      process 0 writes a marker, the others must see it.
  main_process_first(fn, what)
      process 0 runs fn (e.g. prepares the dataset) while the others wait,
      then they run it (and find the work done on shared storage).

`jax.distributed.initialize()` also starts JAX's preemption service, which
lets `CheckpointManager.reached_preemption(step)` agree on one step across
hosts when any host gets SIGTERM (training/loop.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from typing import Any, Callable, Mapping, TypeVar

import jax
import numpy as np
from etils import epath

T = TypeVar('T')

# A hand-made cluster without a launcher: JAX reads JAX_COORDINATOR_ADDRESS
# itself; these two complete it (as config.num_processes / process_id do).
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'

_initialized = False


class DistributedSetupError(RuntimeError):
  """The processes of a multi-process run did not come together as expected."""


@dataclasses.dataclass(frozen=True)
class Launcher:
  """What started this process, as its environment tells."""
  name: str
  num_processes: int | None  # None: only JAX can tell (Cloud TPU metadata)
  evidence: str  # the variables that show it, for messages


def _count(value: str | None) -> int | None:
  try:
    return int(value) if value is not None else None
  except ValueError:
    return None


def _on_cloud_tpu_vm() -> bool:
  """JAX's own finding at import: libtpu installed and TPU chips on the PCI bus."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  except ImportError:  # moved in a later JAX: no auto-start on TPU VMs
    return False
  return bool(getattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', False))


def detect_launcher(environ: Mapping[str, str] | None = None,
                    on_cloud_tpu_vm: bool | None = None) -> Launcher | None:
  """The cluster launcher of this process, from the variables JAX reads.

  Same detections as `jax.distributed.initialize()`'s own (jax/_src/clusters),
  in its order, so that 'detected here' means 'JAX can start it'.
  """
  env = os.environ if environ is None else environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return Launcher('JAX_COORDINATOR_ADDRESS', _count(env.get(ENV_NUM_PROCESSES)),
                    f'JAX_COORDINATOR_ADDRESS={env["JAX_COORDINATOR_ADDRESS"]}')
  slurm = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
           'SLURM_LOCALID')
  if all(name in env for name in slurm):
    return Launcher('SLURM', _count(env['SLURM_NTASKS']),
                    f'SLURM_NTASKS={env["SLURM_NTASKS"]}')
  if 'OMPI_COMM_WORLD_SIZE' in env:
    return Launcher('Open MPI', _count(env['OMPI_COMM_WORLD_SIZE']),
                    f'OMPI_COMM_WORLD_SIZE={env["OMPI_COMM_WORLD_SIZE"]}')
  for name in ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES'):
    if env.get(name):
      hosts = [h for h in env[name].split(',') if h.strip()]
      return Launcher('TPU workers', len(hosts), f'{name} ({len(hosts)} hosts)')
  if on_cloud_tpu_vm is None:
    on_cloud_tpu_vm = _on_cloud_tpu_vm()
  if on_cloud_tpu_vm:
    return Launcher('Cloud TPU VM', None, 'TPU chips and libtpu on this VM')
  return None


def _wants_initialize(setting: bool | None, launcher: Launcher | None) -> bool:
  if setting is not None:
    return bool(setting)
  return launcher is not None and (launcher.num_processes is None
                                   or launcher.num_processes > 1)


def _initialize_kwargs(config) -> dict[str, Any]:
  kwargs = {}
  for name in ('coordinator_address', 'num_processes', 'process_id'):
    if config is not None and config.get(name) is not None:
      kwargs[name] = config.get(name)
  for name, variable in (('num_processes', ENV_NUM_PROCESSES),
                         ('process_id', ENV_PROCESS_ID)):
    if name not in kwargs and _count(os.environ.get(variable)) is not None:
      kwargs[name] = _count(os.environ[variable])
  return kwargs


def maybe_initialize_distributed(config=None) -> bool:
  """Joins the other processes of this run, if there are any; then checks.

  Must run before anything touches a device (train.py, eval.py and
  predict.py call it first). Idempotent. CPU collectives use gloo, so the
  same code runs several CPU processes on one machine (the multi-host
  tests). Returns whether `jax.distributed` is initialised. Raises
  DistributedSetupError when initialisation fails or when the launcher
  started more processes than JAX joined.
  """
  global _initialized
  setting = None if config is None else config.get('distributed', None)
  launcher = detect_launcher()
  _initialized = _initialized or jax.distributed.is_initialized()  # by a caller
  if not _initialized and _wants_initialize(setting, launcher):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    kwargs = _initialize_kwargs(config)
    try:
      jax.distributed.initialize(**kwargs)
    except Exception as e:  # JAX raises ValueError, RuntimeError or its own errors
      found = f'{launcher.name} ({launcher.evidence})' if launcher else 'no launcher'
      raise DistributedSetupError(
          f'jax.distributed.initialize({", ".join(f"{k}={v!r}" for k, v in kwargs.items())}) '
          f'failed; found {found}: {type(e).__name__}: {e}. Start one process '
          'per host (TPU VM: gcloud ... ssh --worker=all) or per task (SLURM: '
          'srun), or give --config.coordinator_address, --config.num_processes '
          'and --config.process_id (docs/training.md, "Multi-host").') from e
    _initialized = True
    logging.info('jax.distributed initialised: process %d of %d, %d devices '
                 '(%d local)', jax.process_index(), jax.process_count(),
                 jax.device_count(), jax.local_device_count())
  check_process_count(launcher, setting)
  return _initialized


def check_process_count(launcher: Launcher | None, setting: bool | None = None,
                        process_count: int | None = None) -> None:
  """Raises when the launcher started N > 1 processes but JAX runs fewer.

  Without this, each of N processes would train alone on its own chips,
  with its own copy of the run written into the same workdir.
  """
  if launcher is None or not launcher.num_processes or launcher.num_processes <= 1:
    return
  if process_count is None:
    process_count = jax.process_count()
  if process_count == launcher.num_processes:
    return
  why = ('config.distributed=False turned jax.distributed.initialize() off; '
         'leave it unset (None: automatic)' if setting is False else
         'check that every process got the same launcher settings')
  raise DistributedSetupError(
      f'{launcher.name} started {launcher.num_processes} processes '
      f'({launcher.evidence}) but JAX runs {process_count}: {why} '
      '(docs/training.md, "Multi-host").')


# ---------------------------------------------------------------- barriers


def _gather(values: np.ndarray) -> np.ndarray:
  """[process_count, ...]: every process's `values`, on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(values))


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier of the same name."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def main_process_first(fn: Callable[[], T], what: str) -> T:
  """Process 0 runs `fn`, then every other process does.

  For work that shared storage needs done once (preparing a dataset into a
  shared data_dir): the others then find it done. A failure on process 0
  stops every process with an error (instead of leaving them at the barrier).
  """
  if jax.process_count() == 1:
    return fn()
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = fn()
    except Exception as e:  # re-raised below, after telling the others
      error = e
  ok = _gather(np.array([error is None], np.int32))
  if error is not None:
    raise error
  if not ok[0, 0]:
    raise DistributedSetupError(f'process 0 failed to {what} (see its log)')
  if jax.process_index() != 0:
    result = fn()
  return result


def check_shared_workdir(workdir: str | os.PathLike) -> None:
  """Raises on every process unless all see the same workdir.

  Process 0 writes a marker file with a fresh name; after a barrier every
  process looks for it. A workdir on each host's local disk would split
  the checkpoints between hosts (each holding only its own part) and make
  them unrestorable.
  """
  if jax.process_count() == 1:
    return
  root = epath.Path(workdir)
  # A fresh marker name, the same on every process: process 0's random bits.
  nonce = _gather(np.frombuffer(uuid.uuid4().bytes, np.uint32))[0]
  marker = root / f'.shared-workdir-check-{"".join(f"{x:08x}" for x in nonce)}'
  seen, problem = False, ''
  if jax.process_index() == 0:
    try:
      root.mkdir(parents=True, exist_ok=True)
      marker.write_text('written by process 0 to check that every process sees it\n')
      seen = True
    except OSError as e:
      problem = f' (process 0 could not write it: {e})'
  flags = _gather(np.array([seen], np.int32))  # also the barrier after the write
  if jax.process_index() != 0:
    seen = marker.exists()
  flags = _gather(np.array([seen], np.int32))[:, 0]
  if jax.process_index() == 0:
    try:
      marker.unlink()
    except OSError:
      pass
  missing = [i for i, s in enumerate(flags) if not s]
  if missing:
    raise DistributedSetupError(
        f'the workdir {os.fspath(workdir)!r} is not shared: a file process 0 '
        f'wrote there is not visible to process(es) {missing}{problem}. Every '
        'process must write into the same directory: use a gs:// bucket or a '
        'shared filesystem (NFS, a gcsfuse mount), not a host-local path.')
