"""The package's parts and which may import which, read from the source.

  paths        user paths that may be gs:// URLs: imports nothing of ours,
               so every part may use it
  attention/   masks, tile layout, kernels, bottleneck: imports only itself,
               JAX, Flax, NumPy, chex (the kernels' argument checks; pinned
               in requirements.txt) and the standard library
  data/        TFDS builders, input pipeline, image reader: nothing of the model
  metrics      split-level metrics, shared by training and evaluation
  models       layers.py and models.py: build on attention/
  training/    the loop and its state, checkpoints, logs: builds on the above
  evaluation/  reports, timings, pictures, prediction: builds on training/
  entry        summary, convert_torch, export (command-line programs): anything

Every import statement counts, also those inside functions (a lazy import
is still a dependency). The modules are parsed with `ast`, never imported.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'lintunet_jax'

PARTS = {  # module name prefix -> part (longest prefix wins)
    'lintunet_jax.paths': 'paths',
    'lintunet_jax.attention': 'attention',
    'lintunet_jax.data': 'data',
    'lintunet_jax.metrics': 'metrics',
    'lintunet_jax.layers': 'models',
    'lintunet_jax.models': 'models',
    'lintunet_jax.training': 'training',
    'lintunet_jax.evaluation': 'evaluation',
    'lintunet_jax.summary': 'entry',
    'lintunet_jax.convert_torch': 'entry',
    'lintunet_jax.export': 'entry',
    'lintunet_jax': 'entry',  # the (empty) package __init__
}
ALLOWED = {  # part -> the parts it may import (itself included)
    'paths': {'paths'},
    'attention': {'attention'},
    'data': {'data', 'paths'},
    'metrics': {'metrics'},
    'models': {'models', 'attention'},
    'training': {'training', 'models', 'attention', 'data', 'metrics', 'paths'},
    'evaluation': {'evaluation', 'training', 'models', 'attention', 'data', 'metrics',
                   'paths'},
    'entry': {'entry', 'evaluation', 'training', 'models', 'attention', 'data', 'metrics',
              'paths'},
}
ATTENTION_THIRD_PARTY = {'jax', 'flax', 'numpy', 'chex'}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _is_package(name: str) -> bool:
  return MODULES.get(name) is not None and MODULES[name].name == '__init__.py'


def _imports(name: str, source: str | None = None) -> list[tuple[str, int]]:
  """(imported module, line) for every import in module `name`.

  `from P import n` counts as importing P.n when that is a module of ours,
  else as importing P (n is a name defined in P). `source` replaces the
  module's file (for the tests of this test).
  """
  if source is None:
    source = MODULES[name].read_text()
  tree = ast.parse(source)
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(alias.name, node.lineno) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative: resolve against this module's package
        package = name if _is_package(name) else name.rpartition('.')[0]
        for _ in range(node.level - 1):
          package = package.rpartition('.')[0]
        base = f'{package}.{base}' if base else package
      for alias in node.names:
        full = f'{base}.{alias.name}'
        found.append((full if full in MODULES else base, node.lineno))
  return found


def _part(module: str) -> str:
  prefix = max((p for p in PARTS if module == p or module.startswith(p + '.')), key=len)
  return PARTS[prefix]


def _internal(imported: str) -> bool:
  return imported == 'lintunet_jax' or imported.startswith('lintunet_jax.')


def test_every_module_belongs_to_a_part():
  # A new top-level module must be placed in PARTS deliberately.
  unplaced = [m for m in MODULES
              if not any(m == p or m.startswith(p + '.') for p in PARTS if p != 'lintunet_jax')
              and m != 'lintunet_jax']
  assert not unplaced, f'add these modules to a part in PARTS: {unplaced}'
  assert {'lintunet_jax.attention.masks', 'lintunet_jax.data.pipeline',
          'lintunet_jax.training.loop', 'lintunet_jax.evaluation.report'} <= set(MODULES)


def _upward_imports(module: str, source: str | None = None) -> list[str]:
  part = _part(module)
  return [f'line {line}: {imported} ({_part(imported)})'
          for imported, line in _imports(module, source)
          if _internal(imported) and _part(imported) not in ALLOWED[part]]


@pytest.mark.parametrize('module', sorted(MODULES))
def test_imports_point_down(module):
  part = _part(module)
  wrong = _upward_imports(module)
  assert not wrong, (f'{module} ({part}) may import only {sorted(ALLOWED[part])}; '
                     f'it imports: {wrong}')


def test_attention_imports_only_jax_flax_numpy_chex_and_the_standard_library():
  allowed = ATTENTION_THIRD_PARTY | set(sys.stdlib_module_names) | {'__future__'}
  wrong = []
  for module in MODULES:
    if _part(module) != 'attention':
      continue
    for imported, line in _imports(module):
      top = imported.split('.')[0]
      if not (imported.startswith('lintunet_jax.attention') or top in allowed):
        wrong.append(f'{module} line {line}: {imported}')
  assert not wrong


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle of `graph` (module -> imported modules), or None."""
  done, stack = set(), []

  def visit(module):
    if module in stack:
      return stack[stack.index(module):] + [module]
    if module in done:
      return None
    stack.append(module)
    for imported in sorted(graph.get(module, ())):
      cycle = visit(imported)
      if cycle:
        return cycle
    stack.pop()
    done.add(module)
    return None

  for module in sorted(graph):
    cycle = visit(module)
    if cycle:
      return cycle
  return None


def test_no_import_cycles():
  # A package's __init__ importing its own submodules is not a cycle: they
  # import their siblings as `from package import sibling`, which resolves
  # to the sibling module, never to the __init__.
  graph = {m: {i for i, _ in _imports(m) if i in MODULES and i != m} for m in MODULES}
  cycle = _find_cycle(graph)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_the_checks_catch_violations():
  # paths is below every part that reads user paths, and imports none of them.
  assert _upward_imports('lintunet_jax.data.image_io',
                         'from lintunet_jax import paths\n') == []
  assert _upward_imports('lintunet_jax.paths', 'from lintunet_jax.data import image_io\n') == [
      'line 1: lintunet_jax.data.image_io (data)']
  # A lazy import (inside a function) of training from the models counts.
  source = 'def f():\n  from lintunet_jax.training import loop\n'
  assert _upward_imports('lintunet_jax.models', source) == [
      'line 2: lintunet_jax.training.loop (training)']
  # The two kernels importing each other, as they once did.
  source = 'from lintunet_jax.attention import pallas\n'
  assert _imports('lintunet_jax.attention.xla', source) == [
      ('lintunet_jax.attention.pallas', 1)]
  assert _find_cycle({'xla': {'pallas', 'layout'}, 'pallas': {'xla'}}) == [
      'pallas', 'xla', 'pallas']
  assert _find_cycle({'xla': {'pallas', 'layout'}, 'pallas': {'layout'}}) is None
