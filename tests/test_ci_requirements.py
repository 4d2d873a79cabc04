"""Under CI the PyTorch parity tests cannot be skipped (issue 16, item 13).

tests/test_convert_torch.py needs torch and linformer, test-only
dependencies. A developer without them gets a skip; CI (environment
variable CI set) installs them, so there their absence must fail the run.
Checked by collecting that module in a subprocess where `import torch`
fails, with and without CI.
"""

import os
import subprocess
import sys

import pytest

from tests import train_testutil as tu

# Runs pytest on the parity module with torch made unimportable.
_COLLECT = """
import sys
sys.modules['torch'] = None  # `import torch` raises ImportError
import pytest
sys.exit(pytest.main(['-q', '--collect-only', '-p', 'no:cacheprovider',
                      'tests/test_convert_torch.py']))
"""


def _collect_without_torch(ci: bool) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != 'CI'}
  if ci:
    env['CI'] = 'true'
  return subprocess.run([sys.executable, '-c', _COLLECT], cwd=tu.ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('ci', [False, True], ids=['local', 'ci'])
def test_missing_torch_skips_locally_and_fails_under_ci(ci):
  result = _collect_without_torch(ci)
  output = result.stdout + result.stderr
  if ci:
    assert result.returncode not in (0, 5), output  # 5: nothing collected
    assert "CI is set but 'torch' is not installed" in output
  else:
    assert result.returncode == 5, output  # module skipped: no tests
    assert 'error' not in output.lower()


def test_an_optional_check_is_left_out_locally_and_fails_under_ci(monkeypatch):
  from tests.optional_deps import optional  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv('CI', raising=False)
  assert optional('no_such_module_for_lintunet') is None
  assert optional('json') is not None
  monkeypatch.setenv('CI', 'true')
  with pytest.raises(pytest.fail.Exception, match="CI is set but 'no_such_module"):
    optional('no_such_module_for_lintunet')
