"""Times dataset preparation and the training input pipeline on this machine.

Measures, each in a fresh temporary data_dir:
  * preparation of brain_tumor_coco from ../shared/data/brain_tumor_seed
    (2146 JPEGs, 640x640) and of synthetic_mri (2400 slices, 128x128);
  * examples/second of `create_train_iterator` at 256x256 with
    augmentation, for both datasets, with 0 and 2 worker processes.
Wall-clock numbers depend on what else runs: the load average before and
after each measurement is recorded next to it.

Usage:
  python benchmarks/input_pipeline_benchmark.py [--batches 40]
Writes benchmarks/results/input_pipeline_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from lintunet_jax.data import pipeline as input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position

SEED_EXPORT = REPO / '..' / 'shared' / 'data' / 'brain_tumor_seed'
RESULTS = REPO / 'benchmarks' / 'results' / 'input_pipeline_cpu.json'


def _config(name, data_dir, manual_dir=None, workers=0):
  config = default.get_config()
  config.dataset.name = name
  config.dataset.data_dir = str(data_dir)
  config.dataset.manual_dir = str(manual_dir) if manual_dir else None
  config.dataset.image_size = 256
  config.dataset.augment = True
  config.dataset.num_workers = workers
  config.batch_size = 32
  return config


def _cpu_seconds() -> float:
  """CPU time of this process and its (worker) children."""
  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.NoSuchProcess:
      pass
  return total


def time_preparation(config) -> dict:
  load = os.getloadavg()[0]
  started, cpu = time.perf_counter(), time.process_time()
  builder = input_pipeline.prepare_dataset(config)
  return {
      'dataset': f'{builder.name}/{builder.builder_config.name}',
      'examples': {k: v.num_examples for k, v in builder.info.splits.items()},
      'wall_seconds': round(time.perf_counter() - started, 2),
      'cpu_seconds': round(time.process_time() - cpu, 2),
      'stored_megabytes': round(sum(
          f.stat().st_size for f in Path(builder.data_path).iterdir()) / 2**20,
                                    1),
      'load_average_before': round(load, 2),
  }


def time_train_iterator(config, batches: int, warmup: int = 5) -> dict:
  load = os.getloadavg()[0]
  started = time.perf_counter()
  iterator = input_pipeline.create_train_iterator(config, process_index=0,
                                                  process_count=1)
  for _ in range(warmup):
    next(iterator)
  first = time.perf_counter() - started
  cpu, started = _cpu_seconds(), time.perf_counter()
  for _ in range(batches):
    next(iterator)
  wall = time.perf_counter() - started
  cpu = _cpu_seconds() - cpu
  if hasattr(iterator, 'close'):
    iterator.close()
  examples = batches * config.batch_size
  return {
      'dataset': config.dataset.name,
      'num_workers': config.dataset.num_workers,
      'batch_size': config.batch_size,
      'image_size': config.dataset.image_size,
      'augment': config.dataset.augment,
      'examples_per_second': round(examples / wall, 1),
      'cpu_ms_per_example': round(1000 * cpu / examples, 2),
      'startup_and_warmup_seconds': round(first, 2),
      'load_average_before': round(load, 2),
      'load_average_after': round(os.getloadavg()[0], 2),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batches', type=int, default=40)
  args = parser.parse_args()
  results = {
      'machine': {
          'cpu_count': os.cpu_count(),
          'processor': platform.processor() or platform.machine(),
          'python': platform.python_version(),
          'date': time.strftime('%Y-%m-%d %H:%M:%S'),
          'note': ('wall-clock numbers are sensitive to other processes; '
                   'see load_average_*'),
      },
      'preparation': [],
      'train_iterator': [],
  }
  with tempfile.TemporaryDirectory() as scratch:
    datasets = [_config('synthetic_mri', scratch)]
    if SEED_EXPORT.is_dir():
      datasets.insert(0, _config('brain_tumor_coco', scratch,
                                 SEED_EXPORT.resolve()))
    else:
      print(f'{SEED_EXPORT} not found: brain_tumor_coco skipped')
    for config in datasets:
      results['preparation'].append(time_preparation(config))
    for config in datasets:
      for workers in (0, 2):
        config.dataset.num_workers = workers
        results['train_iterator'].append(
            time_train_iterator(config, args.batches))
        print(results['train_iterator'][-1])
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(json.dumps(results, indent=2) + '\n')
  print(json.dumps(results, indent=2))
  print(f'wrote {RESULTS}')


if __name__ == '__main__':
  main()
