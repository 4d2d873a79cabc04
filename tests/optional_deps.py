"""Test-only dependencies of requirements-torch.txt (torch, linformer, monai)."""

from __future__ import annotations

import importlib
import os

import pytest


def require(module: str):
  """Imports a test-only dependency: skipped locally if absent, but under CI
  (env CI set; CI installs requirements-torch.txt) a missing one fails, so
  the tests that need it can never be skipped there unnoticed."""
  if os.environ.get('CI'):
    try:
      return importlib.import_module(module)
    except ImportError as e:
      pytest.fail(f'CI is set but {module!r} is not installed ({e}); CI must '
                  'install requirements-torch.txt', pytrace=False)
  return pytest.importorskip(module)


def optional(module: str):
  """Like `require`, for one check inside a bigger test: None locally if
  absent (the rest of the test still runs), a failure under CI."""
  if os.environ.get('CI'):
    return require(module)
  try:
    return importlib.import_module(module)
  except ImportError:
    return None
