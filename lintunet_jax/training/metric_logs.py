"""Training logs: JSON lines, TensorBoard event files and a progress bar.

(Named metric_logs, not logging: the training modules import the standard
library's `logging` too, and one name for both would confuse a reader.)

`DIR/metrics.jsonl` holds one JSON object per line (format documented in
docs/training.md):

  {"type": "compile", "step": 1, "first_step_s": 31.2, "time": 9.8}
  {"type": "train", "step": 20, "epoch": 1.25, "loss": 0.41, "grad_norm": 0.9,
   "lr": 0.001, "images_per_sec": 85.3, "input_wait_fraction": 0.02,
   "time": 12.4}
  {"type": "eval", "step": 32, "epoch": 2.0, "split": "validation",
   "loss": 0.2, "iou": 0.71, "dice": 0.83, "precision": ..., "recall": ...,
   "accuracy": ..., "iou_per_image": ..., "num_images": 64, ...}
  {"type": "resume", "step": 32, "time": ...}

`step` is the number of optimizer updates done when the record was
written; `time` is seconds since the run (or resumed run) started. Only
process 0 writes. On resume, records of steps after the restored checkpoint
(from a continuation that was lost) are dropped, so the file reads as one
uninterrupted run; TensorBoard purges them likewise (`purge_step`). The
same holds for a run killed before its first checkpoint: it restarts at 0.

A local workdir gets a plain file, appended to line by line. A gs:// object
cannot be appended to, so for URL workdirs the records are kept in memory
and the whole object is rewritten at each flush (at most every `flush_secs`
while writing, before each checkpoint save, and at close): a log of N
records costs N*~200 bytes per upload, small next to a checkpoint. The
TensorBoard event files of URL workdirs are written to a local temporary
folder and copied up at the same moments (tensorboardX's own gs:// writer
re-uploads again when garbage-collected, which can stall a program's exit).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any, Mapping

import numpy as np
from etils import epath

from lintunet_jax import paths

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


def _jsonable(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray)):
    value = value.tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


def read_metrics(workdir: str, kind: str | None = None) -> list[dict]:
  """The records of DIR/metrics.jsonl (of one `type` if given)."""
  path = paths.check(workdir, 'workdir') / METRICS_FILE
  records = []
  if not path.exists():
    return records
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut short by a kill
    if kind is None or record.get('type') == kind:
      records.append(record)
  return records


def _lines(records) -> str:
  return ''.join(json.dumps(record) + '\n' for record in records)


def truncate_metrics(workdir: str, after_step: int) -> int:
  """Drops records with step > after_step (atomically); returns how many."""
  path = paths.check(workdir, 'workdir') / METRICS_FILE
  if not path.exists():
    return 0
  records = read_metrics(workdir)
  keep = [r for r in records if r.get('step', 0) <= after_step]
  paths.write_text(path, _lines(keep))
  return len(records) - len(keep)


def _import_summary_writer():
  """tensorboardX's SummaryWriter, without importing PyTorch.

  tensorboardX imports torch at module level when it is installed (only to
  accept torch tensors), which costs seconds at start-up; we only log
  floats, so torch is hidden while tensorboardX is imported.
  """
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules['torch'] = None  # `import torch` raises ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return SummaryWriter


class MetricWriter:
  """Writes scalars to metrics.jsonl and TensorBoard (process 0 only).

  Local workdirs: the log file is appended to line by line. URL workdirs
  (gs://): records are kept in memory and the log object is rewritten at
  each `flush()`, which `write` calls itself every `flush_secs`; TensorBoard
  events are staged in a local temporary folder and copied up then too.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, start_step: int = 0,
               flush_secs: float = 30.0):
    self.enabled = enabled
    self._start = time.time()
    self._tb = None
    self._file = None
    self._remote = paths.is_url(workdir)
    self._root = paths.check(workdir, 'workdir')
    self._records: list[dict] = []  # URL workdirs: the whole log
    self._dirty = False
    self._flush_secs = flush_secs
    self._last_flush = time.time()
    self._tb_staging = None
    if not enabled:
      return
    self._root.mkdir(parents=True, exist_ok=True)
    # A run (re)starting at start_step: records after it are from a killed
    # continuation (or a killed earlier attempt) and are dropped.
    truncate_metrics(workdir, start_step)
    if self._remote:
      self._records = read_metrics(workdir)
    else:
      self._file = open(self._root / METRICS_FILE, 'a', buffering=1)
    tb_dir = self._root / TENSORBOARD_DIR
    if self._remote:
      self._tb_staging = tempfile.mkdtemp(prefix='lintunet-tensorboard-')
      tb_dir = self._tb_staging
    try:
      SummaryWriter = _import_summary_writer()  # pylint: disable=invalid-name
      # Event files are named by second and host; the suffix keeps a run
      # restarted within the same second from replacing the previous file.
      self._tb = SummaryWriter(os.fspath(tb_dir), purge_step=start_step + 1,
                               flush_secs=30,
                               filename_suffix=f'.{os.getpid()}.{uuid.uuid4().hex[:8]}')
    except ImportError:  # TensorBoard logs are optional
      self._tb = None

  def write(self, kind: str, step: int, scalars: Mapping[str, Any]) -> dict:
    """Appends one record {"type": kind, "step": step, **scalars}."""
    record = {'type': kind, 'step': int(step)}
    record.update({k: _jsonable(v) for k, v in scalars.items()})
    record['time'] = round(time.time() - self._start, 3)
    if not self.enabled:
      return record
    if self._remote:
      self._records.append(record)
      self._dirty = True
    else:
      self._file.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for key, value in scalars.items():
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
          self._tb.add_scalar(f'{kind}/{key}', float(value), int(step))
    if self._remote and time.time() - self._last_flush >= self._flush_secs:
      self.flush()
    return record

  def flush(self) -> None:
    """Makes every record written so far durable (URLs: one upload each)."""
    if self._file:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()
    if self._remote and self.enabled:
      if self._dirty:
        paths.write_text(self._root / METRICS_FILE, _lines(self._records))
        self._dirty = False
      self._upload_tensorboard()
      self._last_flush = time.time()

  def _upload_tensorboard(self) -> None:
    if self._tb_staging is None:
      return
    remote = self._root / TENSORBOARD_DIR
    for name in sorted(os.listdir(self._tb_staging)):
      paths.write_bytes(remote / name, epath.Path(self._tb_staging, name).read_bytes())

  def close(self) -> None:
    if self._file:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._remote and self.enabled:
      self.flush()
    if self._tb_staging is not None:
      shutil.rmtree(self._tb_staging, ignore_errors=True)
      self._tb_staging = None


def progress_bar(total: int, initial: int, enabled: bool):
  """A tqdm bar over optimizer steps (ETA from tqdm's own rate estimate)."""
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, initial=initial, disable=not enabled,
                   unit='step', dynamic_ncols=True, smoothing=0.1,
                   mininterval=0.5, desc='train')
