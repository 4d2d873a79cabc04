"""The install paths agree: one JAX pin everywhere, extras = requirements files.

CPU (requirements.txt), NVIDIA GPUs (requirements-gpu.txt), Cloud TPU VMs
(requirements-tpu.txt), the tests (requirements-test.txt) and the pyproject
extras ([gpu], [tpu], [test], [torch]) are written by hand in several
places; a JAX upgrade that misses one would install two JAX versions' worth
of conflicts on the machines CI never sees.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

import pytest
from packaging.requirements import Requirement

from tests.train_testutil import ROOT

TEST_ONLY = {'pytest', 'scikit-learn', 'portpicker'}


def _name(requirement: Requirement) -> str:
  return re.sub(r'[-_.]+', '-', requirement.name).lower()


def read_requirements(name: str, *, follow: bool = True) -> list[Requirement]:
  """The requirements of a file, with its `-r` includes (when `follow`)."""
  out = []
  for line in (ROOT / name).read_text().splitlines():
    line = line.split('#')[0].strip()
    if not line:
      continue
    if line.startswith('-r '):
      if follow:
        out += read_requirements(line[3:].strip())
      continue
    assert not line.startswith('-'), f'{name}: unexpected option {line!r}'
    out.append(Requirement(line))
  return out


def _pin(requirements, package: str) -> str:
  found = [r for r in requirements if _name(r) == package]
  assert found, f'no {package} requirement'
  specs = {str(r.specifier) for r in found}
  assert len(specs) == 1 and next(iter(specs)).startswith('=='), specs
  return next(iter(specs))[2:]


def _extras():
  with open(ROOT / 'pyproject.toml', 'rb') as f:
    return tomllib.load(f)['project']['optional-dependencies']


def test_one_jax_version_in_every_install_path():
  cpu = read_requirements('requirements.txt')
  version = _pin(cpu, 'jax')
  assert _pin(cpu, 'jaxlib') == version
  for name, extra in (('requirements-gpu.txt', 'cuda12'), ('requirements-tpu.txt', 'tpu')):
    requirements = read_requirements(name)
    assert _pin(requirements, 'jax') == version, name
    assert any(extra in r.extras for r in requirements if _name(r) == 'jax'), name
  for extra in ('gpu', 'tpu'):
    assert _pin([Requirement(r) for r in _extras()[extra]], 'jax') == version, extra


@pytest.mark.parametrize('extra, name', [
    ('gpu', 'requirements-gpu.txt'), ('tpu', 'requirements-tpu.txt'),
    ('test', 'requirements-test.txt'), ('torch', 'requirements-torch.txt')])
def test_pyproject_extras_are_the_requirements_files(extra, name):
  from_file = sorted(str(r) for r in read_requirements(name, follow=False))
  assert sorted(str(Requirement(r)) for r in _extras()[extra]) == from_file


def test_runtime_requirements_hold_no_test_only_packages():
  runtime = {_name(r) for r in read_requirements('requirements.txt')}
  assert not runtime & TEST_ONLY
  assert {_name(r) for r in read_requirements('requirements-test.txt')} >= TEST_ONLY


def test_readme_commands_install_what_they_run():
  lines = (ROOT / 'README.md').read_text().splitlines()
  train = lines[lines.index('# 1. Install and train LinTUNet on the embedded synthetic MRI dataset (CPU: minutes)') + 1]
  tests = next(lines[i + 1] for i, l in enumerate(lines)
               if l.startswith('# 2. Install and run the tests'))
  assert '-r requirements.txt' in train and 'requirements-test' not in train
  assert '-r requirements.txt' in tests and '-r requirements-test.txt' in tests
  assert 'pytest' in tests


def test_libtpu_pin_is_the_one_the_pinned_jax_asks_for():
  version = _pin(read_requirements('requirements.txt'), 'jax')
  if importlib.metadata.version('jax') != version:
    pytest.skip(f'installed jax {importlib.metadata.version("jax")} is not the pinned {version}')
  wanted = [Requirement(r) for r in importlib.metadata.requires('jax')
            if 'extra == "tpu"' in r and r.startswith('libtpu')]
  assert len(wanted) == 1
  pinned = _pin(read_requirements('requirements-tpu.txt'), 'libtpu')
  assert wanted[0].specifier.contains(pinned), (pinned, str(wanted[0]))
