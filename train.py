r"""Train LinTUNet or the U-Net baseline.

  python train.py --config configs/lintunet.py:quick --workdir /tmp/quick   # CPU, minutes
  python train.py --config configs/lintunet.py --workdir DIR                # the seed's recipe
  python train.py --config configs/unet.py --workdir DIR --config.num_epochs=10

`--config.a.b=value` overrides any config field (configs/default.py lists
them). Re-running the same command on the same DIR resumes from the last
complete checkpoint (same batches, same losses); a DIR holding only a
weights checkpoint (e.g. converted PyTorch weights) is fine-tuned from it.
Writes DIR/config.json, DIR/metrics.jsonl, DIR/tensorboard/ and
DIR/checkpoints/; DIR and dataset.data_dir may be gs:// URLs
(docs/training.md). Multi-host: run the same command on every host (or
task); the processes find each other (jax.distributed) where a launcher
started them: a Cloud TPU VM's workers, SLURM's srun, Open MPI's mpirun,
or JAX_COORDINATOR_ADDRESS (docs/training.md).

Exit status: 0 done; 1 a clear error (message on stderr); 143 preempted:
SIGTERM reached the run (any process of it), every process saved the same
step and stopped, so re-running the command resumes with nothing lost.
"""

from __future__ import annotations

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file, e.g. configs/lintunet.py:quick.',
    lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])

# 128 + SIGTERM, what a shell reports for a SIGTERM'd program; here it also
# means a checkpoint of the step reached was completed first.
EXIT_PREEMPTED = 128 + 15


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Our progress lines at INFO; the libraries' (orbax, absl) chatter off
  # unless --verbosity is given.
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.INFO)
    std_logging.getLogger('absl').setLevel(std_logging.ERROR)
    std_logging.getLogger('jax').setLevel(std_logging.WARNING)
    std_logging.getLogger('gcsfs').setLevel(std_logging.WARNING)  # per-read lines
  from lintunet_jax import paths  # pylint: disable=g-import-not-at-top
  try:  # a gs:// workdir without gcsfs fails now, not at the first checkpoint
    paths.check(_WORKDIR.value, '--workdir')
    if _CONFIG.value.dataset.get('data_dir'):
      paths.check(_CONFIG.value.dataset.data_dir, 'config.dataset.data_dir')
  except paths.UnsupportedPathError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  from lintunet_jax.training import distributed  # pylint: disable=g-import-not-at-top
  from lintunet_jax.training import parallel  # pylint: disable=g-import-not-at-top
  try:
    distributed.maybe_initialize_distributed(_CONFIG.value)  # before any device use
  except distributed.DistributedSetupError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  from lintunet_jax.training import loop as train_lib  # pylint: disable=g-import-not-at-top
  try:
    train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (train_lib.NonFiniteLossError, parallel.BatchSizeError,
          train_lib.ConfigError, parallel.NoAcceleratorError,
          distributed.DistributedSetupError) as e:
    print(f'error: {e}', file=sys.stderr)  # a clear message, no traceback
    return 1
  except train_lib.TrainingInterrupted as e:
    print(str(e), file=sys.stderr)
    return EXIT_PREEMPTED
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
