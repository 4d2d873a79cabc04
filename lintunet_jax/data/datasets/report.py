"""What preparation did with the input: counts, quirks handled, and errors.

Real exports have quirks (byte-order marks, images with no annotation,
polygons that leave the image). Each quirk is either handled in a documented
way and counted here, so the user sees what happened, or it stops preparation
with a `DataError` that names the file and the problem. The report is stored
in the prepared dataset's metadata so a later run can print it again.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

# How many offending files an error message lists before saying "and N more".
MAX_LISTED = 10


class DataError(ValueError):
  """Input that cannot be prepared; the message names the file(s) and why."""

  def __init__(self, path: os.PathLike | str, problem: str):
    self.path = os.fspath(path)
    self.problem = problem
    super().__init__(f'{self.path}: {problem}')


def list_some(items: list[Any]) -> str:
  """'a, b, c and 7 more': keeps error messages readable for big folders."""
  shown = ', '.join(str(item) for item in items[:MAX_LISTED])
  extra = len(items) - MAX_LISTED
  return f'{shown} and {extra} more' if extra > 0 else shown


@dataclasses.dataclass
class SplitStats:
  examples: int = 0
  empty_masks: int = 0  # valid data (e.g. a slice without tumour)


@dataclasses.dataclass
class PreparationReport:
  """Mutable tally filled in while a builder generates examples."""

  dataset: str
  source: str
  splits: dict[str, SplitStats] = dataclasses.field(default_factory=dict)
  handled: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  seconds: float = 0.0
  # Folders of the source that no split was read from (e.g. a misspelt split
  # name), relative to the source: listed so that nothing is dropped unseen.
  ignored_folders: list[str] = dataclasses.field(default_factory=list)

  def count(self, what: str, n: int = 1) -> None:
    """Records a quirk handled as documented (e.g. 'polygons clipped')."""
    if n:
      self.handled[what] += n

  def ignore_folders(self, root: Path, folders: list[Path]) -> None:
    """Records sub-folders of the source `root` that were not read."""
    for folder in folders:
      name = Path(folder).relative_to(root).as_posix() + '/'
      if name not in self.ignored_folders:
        self.ignored_folders.append(name)

  def add_example(self, split: str, mask: np.ndarray) -> None:
    stats = self.splits.setdefault(split, SplitStats())
    stats.examples += 1
    if not mask.any():
      stats.empty_masks += 1

  def to_json(self) -> dict[str, Any]:
    return {
        'dataset': self.dataset,
        'source': self.source,
        'seconds': round(self.seconds, 2),
        'splits': {k: dataclasses.asdict(v) for k, v in self.splits.items()},
        'handled': dict(sorted(self.handled.items())),
        'ignored_folders': sorted(self.ignored_folders),
    }

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> PreparationReport:
    return cls(
        dataset=data['dataset'],
        source=data['source'],
        splits={k: SplitStats(**v) for k, v in data['splits'].items()},
        handled=collections.Counter(data['handled']),
        seconds=data.get('seconds', 0.0),
        ignored_folders=list(data.get('ignored_folders', [])),  # newer field
    )

  def format(self) -> str:
    lines = [f'{self.dataset}: prepared from {self.source} '
             f'in {self.seconds:.1f} s']
    lines.append(f'  {"split":<12}{"examples":>10}{"empty masks":>13}')
    order = {'train': 0, 'validation': 1, 'test': 2}
    for name, stats in sorted(self.splits.items(),
                              key=lambda item: (order.get(item[0], 3), item[0])):
      lines.append(
          f'  {name:<12}{stats.examples:>10}{stats.empty_masks:>13}')
    if self.handled:
      lines.append('  handled as documented (docs/data.md):')
      for what, n in sorted(self.handled.items()):
        lines.append(f'    {what}: {n}')
    else:
      lines.append('  no input quirks needed handling')
    if self.ignored_folders:
      lines.append('  folders ignored (not a split, images or masks folder): '
                   + ', '.join(sorted(self.ignored_folders)))
    return '\n'.join(lines)
