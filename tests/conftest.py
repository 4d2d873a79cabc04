"""Test-wide setup: the repository root on sys.path (for `configs`), and
XLA's CPU backend at optimisation level 0 for the tests' own process.

The level only changes how hard XLA optimises the machine code of a
compiled program, not what it computes; compiling is most of what the
in-process tests spend their time on (a tiny train step takes several
times longer at the default level), and the tests' subprocesses already
compile at level 0 (tests/train_testutil.py `env`). Set here, before
anything starts JAX's CPU backend, which reads XLA_FLAGS once.
"""

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

_OPT0 = '--xla_backend_optimization_level=0'
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {_OPT0}'.strip()
