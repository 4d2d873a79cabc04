"""Every module of the package imports.

The quick lane (`pytest -m "not slow"`) leaves out the slow tests, and with
them the only tests that touch some modules; this keeps a module that no
longer imports (a renamed helper, a missing dependency, a syntax error)
from passing the lane unseen. The list is read from the source tree, so a
new module is covered without editing this file.
"""

from __future__ import annotations

import importlib
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'lintunet_jax'


def _modules() -> list[str]:
  names = []
  for path in sorted(PACKAGE.rglob('*.py')):
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    names.append('.'.join(parts[:-1] if parts[-1] == '__init__' else parts))
  return names


def test_the_package_has_the_modules_we_expect():
  modules = _modules()
  assert len(modules) > 30
  assert {'lintunet_jax.paths', 'lintunet_jax.models',
          'lintunet_jax.training.checkpointing'} <= set(modules)


@pytest.mark.parametrize('module', _modules())
def test_module_imports(module):
  importlib.import_module(module)
