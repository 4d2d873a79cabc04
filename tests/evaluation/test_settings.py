"""The evaluation code takes its choices as one settings object: no
function of lintunet_jax/evaluation/, the export or the CLIs takes more than
10 parameters (read from the source; the old entry took 24)."""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest

from lintunet_jax.evaluation import settings

ROOT = pathlib.Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / 'lintunet_jax' / 'evaluation').glob('*.py')) + [
    ROOT / 'lintunet_jax' / 'export.py', ROOT / 'eval.py', ROOT / 'predict.py']
MAX_PARAMETERS = 10


def _counts():
  for path in FILES:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        a = node.args
        names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
        names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
        yield path.relative_to(ROOT), node.name, len([n for n in names
                                                      if n not in ('self', 'cls')])


def test_no_function_takes_more_than_ten_parameters():
  long = [f'{path}:{name} ({n})' for path, name, n in _counts() if n > MAX_PARAMETERS]
  assert not long, long


def test_settings_are_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    settings.EvalSettings().split = 'test'
  with pytest.raises(dataclasses.FrozenInstanceError):
    settings.InferenceChoice().tta = 'flips'
