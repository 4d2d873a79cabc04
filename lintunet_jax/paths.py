"""Paths a user gives (workdir, data_dir, report, outputs): local or URLs.

Every such path may be a local path or a cloud URL such as
`gs://bucket/run`. They are handled with `etils.epath`, which reads and
writes URLs through fsspec (`gcsfs` for gs://); orbax and tensorstore read
the same URLs for checkpoints. Plain `os.path`/`open`/`pathlib` would treat
`gs://bucket/run` as the relative local path `gs:/bucket/run` and silently
create a folder named after the URL, so user paths go through `check`
first: a URL whose scheme has no backend installed fails at start-up with
the package to install, before anything is written.

  check(path, what)    -> epath.Path; raises UnsupportedPathError
  is_url(path)         -> whether it is a URL (gs://...)
  absolute(path)       -> str: URLs unchanged, local paths made absolute
  write_text(path, s)  -> writes a whole file so no reader sees half of it

Object stores differ from disks in two ways the callers rely on: an object
is written whole or not at all (no rename needed for atomicity), and an
object cannot be appended to (logs are rewritten whole, see
training/metric_logs.py).

Every gs:// request has a deadline (`GCS_REQUEST_TIMEOUT_S`). gcsfs's
default is none at all: it passes `timeout=None` to aiohttp, which then
waits forever for a reply, so one request the server accepts and never
answers (a stalled connection, an emulator whose log pipe is full) froze
train.py or eval.py inside fsspec's `sync` with no error. With the deadline
such a request fails with fsspec's FSTimeoutError instead. Set
FSSPEC_GCS_REQUESTS_TIMEOUT (seconds; fsspec's own variable) to change it.
"""

from __future__ import annotations

import importlib
import os
import re

from etils import epath
import fsspec.config

# Seconds one gs:// HTTP request may take, reply included (gcsfs reads and
# writes in blocks of a few MiB, so this is far above a healthy request).
GCS_REQUEST_TIMEOUT_S = 120.0

# URL scheme -> the fsspec package that epath needs for it. gs:// is tested
# against a GCS emulator (tests/test_cloud_storage.py); s3:// takes the same
# code path (epath + s3fs, tensorstore's s3 driver) but is untested.
BACKENDS = {'gs': 'gcsfs', 's3': 's3fs'}
_URL = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*)://')


class UnsupportedPathError(ValueError):
  """A URL whose scheme is unknown or whose backend package is missing."""


def _bound_gcs_requests(seconds: float = GCS_REQUEST_TIMEOUT_S) -> None:
  """Gives gcsfs a request deadline unless the user configured one.

  fsspec applies `fsspec.config.conf[protocol]` to every filesystem it
  creates afterwards (gcsfs answers to 'gs' and 'gcs'), so this must run
  before the first gs:// access: it runs when this module is imported,
  which every entry point does before touching a user path.
  """
  conf = fsspec.config.conf
  if any('requests_timeout' in conf.get(key, {}) for key in ('gs', 'gcs')):
    return
  conf.setdefault('gcs', {})['requests_timeout'] = seconds


_bound_gcs_requests()


def scheme(path: str | os.PathLike) -> str | None:
  """'gs' for 'gs://b/x', None for local paths."""
  match = _URL.match(os.fspath(path))
  return match.group(1).lower() if match else None


def is_url(path: str | os.PathLike) -> bool:
  return scheme(path) is not None


def check(path: str | os.PathLike, what: str = 'path') -> epath.Path:
  """The path as an epath.Path, after checking that its scheme can be used.

  `what` names the setting in the error (e.g. '--workdir'). Local paths
  get `~` expanded. Nothing is created.
  """
  text = os.fspath(path)
  name = scheme(text)
  if name is None:
    return epath.Path(os.path.expanduser(text))
  if name not in BACKENDS:
    known = ', '.join(f'{s}://' for s in BACKENDS)
    raise UnsupportedPathError(
        f'{what} {text!r}: {name}:// URLs are not supported (supported: local '
        f'paths and {known})')
  package = BACKENDS[name]
  try:
    importlib.import_module(package)
  except ImportError:
    raise UnsupportedPathError(
        f'{what} {text!r}: {name}:// paths need the {package!r} package, which '
        f'is not installed: pip install {package}') from None
  return epath.Path(text)


def absolute(path: str | os.PathLike) -> str:
  """URLs unchanged; local paths absolute (for reports and tensorstore)."""
  text = os.fspath(path)
  return text if is_url(text) else os.path.abspath(os.path.expanduser(text))


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes a whole file so that readers see the old or the new content.

  Local: a temporary file renamed over the target. URL: one object upload,
  which the store makes visible only when complete.
  """
  write_bytes(path, text.encode('utf-8'))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """`write_text` for bytes (PNG, .npy)."""
  target = check(path)
  if is_url(path):
    target.write_bytes(data)
    return
  tmp = target.parent / f'.{target.name}.tmp-{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, target)
