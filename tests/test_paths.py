"""paths: every gs:// request has a deadline.

gcsfs sends its requests with no timeout, so a server that accepts a
connection and never answers used to freeze the program inside fsspec's
`sync`. The server here is a socket on 127.0.0.1 that accepts and stays
silent; each check runs in a fresh interpreter (fsspec caches filesystems
and their settings per process) under its own hard timeout.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

from lintunet_jax import paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def silent_server():
  """URL of a server that accepts connections and never replies."""
  server = socket.socket()
  server.bind(('127.0.0.1', 0))
  server.listen(64)
  held = []
  stop = threading.Event()

  def accept():
    while not stop.is_set():
      try:
        held.append(server.accept()[0])
      except OSError:
        return

  thread = threading.Thread(target=accept, daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.getsockname()[1]}'
  finally:
    stop.set()
    server.close()
    for conn in held:
      conn.close()


def _python(code: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
  full_env = {k: v for k, v in os.environ.items() if not k.startswith('FSSPEC_')}
  full_env.update(GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false', PYTHONPATH=ROOT, **env)
  return subprocess.run([sys.executable, '-c', code], env=full_env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def test_gcs_filesystems_get_the_default_deadline():
  result = _python(
      'import gcsfs\n'
      'from lintunet_jax import paths\n'
      'fs = gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)\n'
      'print(fs.requests_timeout)\n', timeout=60)
  assert result.returncode == 0, result.stderr[-3000:]
  assert float(result.stdout.split()[-1]) == paths.GCS_REQUEST_TIMEOUT_S


def test_the_users_fsspec_setting_wins():
  result = _python(
      'import gcsfs\n'
      'from lintunet_jax import paths\n'
      'fs = gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)\n'
      'print(fs.requests_timeout)\n', timeout=60, FSSPEC_GCS_REQUESTS_TIMEOUT='7')
  assert result.returncode == 0, result.stderr[-3000:]
  assert float(result.stdout.split()[-1]) == 7.0


def test_a_server_that_never_answers_fails_instead_of_hanging():
  # The deadline that paths sets (shortened): without it the read below
  # waits forever and the hard timeout fails the test.
  with silent_server() as url:
    started = time.monotonic()
    result = _python(
        'import fsspec.config\n'
        'from lintunet_jax import paths\n'
        'fsspec.config.conf.pop("gcs", None)\n'
        'paths._bound_gcs_requests(2.0)\n'
        'from lintunet_jax.training import metric_logs\n'
        'metric_logs.read_metrics("gs://bucket/run")\n',
        timeout=90, STORAGE_EMULATOR_HOST=url)
    elapsed = time.monotonic() - started
  assert result.returncode != 0
  assert 'FSTimeoutError' in result.stderr, result.stderr[-3000:]
  assert elapsed < 60
