"""Local paths and URLs (`gs://bucket/dir`, `file:///dir`): one abstraction for every tool.

  is_url(p)          "gs://b/x", "file:///x", or a path object made from one -> True;
                     "/x", "x", pathlib.Path -> False
  as_path(p)         the object every reader and writer works with: an absolute pathlib.Path for
                     a local path, an `etils.epath` path for a URL (same methods: `/`, exists,
                     is_dir, iterdir, glob, open, read_text, write_text, mkdir, ...)
  kvstore_spec(p)    the TensorStore kvstore of the directory `p` (a URL is passed as the URL
                     string; TensorStore's `gcs` and `file` drivers parse it)
  orbax_path(p)      what Orbax is handed for `p` (see below)
  url_key(p)         the normalised URL of `p`, for comparing an output with the inputs
  remove_tree(p), copy_file(src, dst), file_size(p)   the operations pathlib spells differently
  tensorboard_logdir(p)  a logdir tensorboardX can write, a URL included

Which code reaches the storage:
  files (configs, JSON, safetensors, metrics)   `etils.epath`; for `gs://` etils uses
                                                `tf.io.gfile` (TensorFlow is a dependency of
                                                maxnucl), or fsspec + gcsfs when
                                                EPATH_USE_TF=false
  arrays written and read by maxnucl            TensorStore kvstore drivers (`gcs`, `file`)
  Orbax checkpoints (save, load, trainer)       Orbax, given an `epath.Path`: `gs://` as it is
                                                (Orbax then marks a finished checkpoint with
                                                `commit_success.txt` instead of renaming it);
                                                a `file://` URL as its local path, since Orbax
                                                only knows local paths and `gs://`
How a URL output is published (a bucket has no rename) is `maxnucl.outputs`'s business.

`file://` URLs exist so that the URL code path runs, and is tested, on a local disk: `as_path`
gives a `FileURLPath`, an epath path whose string form *is* the URL and whose file operations go
through the same epath backend as `gs://` (tf.io.gfile, or fsspec), so a URL output is built,
published and read exactly as one in a bucket would be (its `rename` is refused: nothing may rely
on one).  It is not silently turned into a local path, except for Orbax (above).

No module here imports etils at import time: local paths need only the standard library (the
data pipeline, which uses `maxnucl.outputs`, runs without etils).
"""

from __future__ import annotations

import functools
import os
import pathlib
import posixpath
import re
import sys
from typing import Any, Union

# pathlib.Path for a local path; an etils.epath.Path for a URL.
Path = Union[pathlib.Path, Any]
PathLike = Union[str, os.PathLike]

FILE_SCHEME = "file://"
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_COLLAPSED_URL = re.compile(r"^(gs|s3|az|hf|file):/[^/]")  # pathlib.Path("gs://b") -> "gs:/b"
_INTERNAL_ROOT = "/file:"  # how a FileURLPath spells "file://" among its path parts


def is_url(path: PathLike) -> bool:
  """Whether `path` is a URL (`scheme://...`) rather than a local path."""
  return bool(_URL.match(os.fspath(path)))


def as_path(path: PathLike) -> Path:
  """`path` as a path object: an absolute pathlib.Path, or an epath path for a URL.

  Raises ValueError for a URL whose scheme etils does not know (it knows gs://, s3://, az://,
  hf://; file:// is added here), and for a local path that looks like a URL whose `//` was
  collapsed by pathlib (`pathlib.Path("gs://b")` is "gs:/b": pass the URL as a string).
  """
  if _is_url_path(path):
    return path
  text = os.fspath(path)
  match = _URL.match(text)
  if match is None:
    if _COLLAPSED_URL.match(text):
      raise ValueError(f"path {text!r} looks like a URL whose '//' was collapsed (as "
                       f"pathlib.Path('gs://bucket') does); pass the URL as a string")
    return pathlib.Path(text).absolute()
  scheme = match.group(1).lower()
  if scheme == "file":
    return file_url_path_class()(text)
  from etils import epath  # pylint: disable=import-outside-toplevel
  try:
    return epath.Path(text)
  except KeyError:
    raise ValueError(f"{text}: unsupported URL scheme {scheme}:// (supported: gs://, s3://, "
                     f"az://, hf://, file://, or a local path)") from None


def _is_url_path(path: Any) -> bool:
  """An epath object whose string is a URL (gs://..., or a FileURLPath)."""
  etils_path = sys.modules.get("etils.epath")
  return (etils_path is not None and isinstance(path, etils_path.Path)
          and is_url(os.fspath(path)))


def kvstore_spec(path: PathLike) -> Union[dict, str]:
  """The TensorStore kvstore spec of the directory `path` (keys below it are its files)."""
  path = as_path(path)
  if is_url(path):
    return os.fspath(path).rstrip("/") + "/"
  return {"driver": "file", "path": f"{path}/"}


def orbax_path(path: PathLike):
  """What Orbax is given: a local path as it is, a `gs://` URL as an epath path, a `file://`
  URL as the local path it names (Orbax knows no file:// URLs)."""
  path = as_path(path)
  if isinstance(path, file_url_path_class()):
    return path.local_path
  return path


def url_key(path: PathLike) -> str:
  """The normalised URL of `path`: `file://` + the real path (symlinks resolved) for a local
  path or a file:// URL; otherwise `scheme://` + the normalised rest (no `.`, `..`, doubled or
  trailing `/`).  Two paths name the same place when their keys are equal."""
  path = as_path(path)
  if not is_url(path):
    return FILE_SCHEME + os.path.realpath(path)
  if isinstance(path, file_url_path_class()):
    return FILE_SCHEME + os.path.realpath(path.local_path)
  scheme, rest = os.fspath(path).split("://", 1)
  rest = posixpath.normpath(rest) if rest else ""
  return f"{scheme.lower()}://{'' if rest == '.' else rest.lstrip('/')}"


def key_within(inner: str, outer: str) -> bool:
  """Whether the url_key `inner` is `outer` or lies below it."""
  return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def exists(path: Path) -> bool:
  """Whether anything is at `path` (for a local path: a dangling symlink counts)."""
  return path.exists() if is_url(path) else os.path.lexists(path)


def remove_tree(path: Path) -> None:
  """Delete the file or directory (with everything below it) at `path`; nothing if absent."""
  if is_url(path):
    if path.is_dir():
      path.rmtree(missing_ok=True)
    elif path.exists():
      path.unlink(missing_ok=True)
    return
  import shutil  # pylint: disable=import-outside-toplevel
  if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
    path.unlink(missing_ok=True)
  else:
    shutil.rmtree(path, ignore_errors=True)


def copy_file(source: Path, target: Path) -> None:
  """Copy one file (within a bucket: a server-side copy where the backend does that)."""
  if is_url(source) and is_url(target):
    source.copy(target, overwrite=True)
  else:
    with source.open("rb") as src, target.open("wb") as dst:
      while chunk := src.read(64 << 20):
        dst.write(chunk)


def file_size(path: Path) -> int:
  """The size of the file at `path` in bytes."""
  return path.stat().length if is_url(path) else path.stat().st_size


def files_below(root: Path) -> list[tuple[str, ...]]:
  """The files below the directory `root`, as relative part tuples, sorted (directories are not
  listed: a bucket has none, only object names with `/` in them)."""
  out = []
  for child in root.iterdir():
    if child.is_dir():
      out += [(child.name, *rest) for rest in files_below(child)]
    else:
      out.append((child.name,))
  return sorted(out)


def tensorboard_logdir(path: PathLike) -> str:
  """The logdir string to give tensorboardX's SummaryWriter for the directory `path`.

  tensorboardX writes local paths itself, `s3://` through boto3, and `gs://` through
  google-cloud-storage; a logdir with any other URL would become a local directory named
  "file:".  For every URL but `s3://` (with boto3) this registers an event-file writer that goes
  through etils.epath (`_EpathEventFile`: each flush uploads the event file so far as one
  object), `gs://` included: tensorboardX's own GCS writer uploads the file again whenever the
  writer object is garbage-collected, after `close` too, and retries for two minutes where the
  bucket cannot be reached then (at interpreter exit, say); and epath is the client that reaches
  the bucket for every other file of a run.
  """
  path = as_path(path)
  if not is_url(path):
    return str(path)
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel
  scheme = os.fspath(path).split("://", 1)[0]
  if not (scheme == "s3" and record_writer.S3_ENABLED):
    record_writer.register_writer_factory(scheme, _EpathEventFiles())
  return os.fspath(path)


class _EpathEventFiles:
  """tensorboardX writer factory (`directory_check`, `open`) for URLs, through etils.epath."""

  def directory_check(self, logdir: str) -> None:
    as_path(logdir).mkdir(parents=True, exist_ok=True)

  def open(self, filename: str):
    return _EpathEventFile(as_path(filename))


class _EpathEventFile:
  """An event file at a URL, uploaded whole at every `flush` (a bucket object is written whole:
  an upload left open until `close` would lose every event of a run that is killed).  A killed
  run leaves the file as of its last flush, as a local file would be; each flush re-uploads the
  file so far (kilobytes per thousand logged steps)."""

  def __init__(self, path):
    self._path, self._data, self._flushed = path, bytearray(), -1

  def write(self, data: bytes) -> None:
    self._data += bytes(data)

  def flush(self) -> None:
    if self._flushed != len(self._data):
      self._path.write_bytes(bytes(self._data))
      self._flushed = len(self._data)

  def close(self) -> None:
    self.flush()


# ---- file:// URLs through epath ---------------------------------------------------------------

@functools.cache
def file_url_path_class():
  """The epath path class of `file://` URLs (made on first use: it imports etils)."""
  from etils.epath import backend as backend_lib  # pylint: disable=import-outside-toplevel
  from etils.epath import gpath  # pylint: disable=import-outside-toplevel

  def internal(parts) -> tuple[str, ...]:
    """Path parts -> the one internal string `/file:/abs/path` (as etils spells gs://b as
    /gs/b).  Accepts the URL, the internal form, and (what fsspec's walk yields) a plain
    absolute local path."""
    text = "/".join(os.fspath(p) for p in parts)
    if text.startswith(FILE_SCHEME):
      local = text[len(FILE_SCHEME):]
      if not local.startswith("/"):
        raise ValueError(f"{text}: a file:// URL names an absolute local path (file:///dir), "
                         f"not a host")
      return (_INTERNAL_ROOT + local,)
    if text == _INTERNAL_ROOT or text.startswith(_INTERNAL_ROOT + "/"):
      return (text,)
    if text.startswith("/"):
      return (_INTERNAL_ROOT + text,)
    raise ValueError(f"{text!r}: not a file:// URL (expected file:///absolute/path)")

  class FileURLPath(gpath.PosixGPath):
    """An epath path for `file:///abs/path` URLs: its string form is the URL, and its file
    operations go through the backend epath uses for gs:// (tf.io.gfile, which also knows
    file:// URLs, or fsspec), so that a file:// URL stands in for a bucket in tests.  A bucket
    has no rename, so `rename` and `replace` are refused."""

    if sys.version_info < (3, 12):
      def __new__(cls, *parts):
        return super().__new__(cls, *internal(parts))
    else:
      def __init__(self, *parts):
        super().__init__(*internal(parts))

    @property
    def _uri_scheme(self):
      return "file" if self.parts[:2] == ("/", _INTERNAL_ROOT[1:]) else None

    @property
    def _path_str(self) -> str:
      return FILE_SCHEME + "/" + "/".join(self.parts[2:])

    @property
    def _backend(self):
      # pylint: disable=protected-access
      return backend_lib.tf_backend if gpath._is_tf_installed() else backend_lib.fsspec_backend

    @property
    def local_path(self) -> pathlib.Path:
      """The local path this URL names."""
      return pathlib.Path("/" + "/".join(self.parts[2:]))

    def resolve(self, strict: bool = False):
      del strict
      return self

    def rename(self, target):
      raise NotImplementedError(f"{self}: a bucket has no rename, and a file:// URL stands in "
                                f"for one (rename to {target} refused)")

    replace = rename

  return FileURLPath
