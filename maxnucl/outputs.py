"""Where the tools write: never into an input, through owned temporary directories, in one step.

  check_output_path(output, {"input checkpoint": ckpt}, overwrite=...)   before any work: refuses
      an output that is an input, lies inside one or (when it replaces a whole directory) contains
      one, symlinks resolved; an existing output without --overwrite; an unwritable location
  check_output_file(report, {...}, flag="--report")                     the same for one file
  with TemporaryOutput(output, overwrite) as tmp:                       build the output in `tmp`
      ...                                                               (renamed into place on
                                                                        success, removed on error)
  replace_directory(tmp, path, overwrite)                               one-step replacement
  publish(tmp, url, overwrite), is_committed(url)                       the same for a URL output
  move_aside(directory, name)                                           to a free sibling name,
                                                                        never losing the only copy
  remove_stale_temporaries(output)                                      temporaries of killed runs
  write_file_atomically(report, text)                                   one file, in one step
  with failed_writes_raised(output): ...                                a full disk -> WriteFailed
  exit_on_sigterm()                                                     SIGTERM cleans up as Ctrl-C

A temporary directory `.NAME.tmp-XXXXXXXX/` (a sibling of the output NAME, so the final rename
stays on one filesystem) holds `owner.json` (pid, process start time, boot id, hostname, pid
namespace of the process that made it) and `content/`, where the output is built.  The owner
record never becomes part of the output, and everything an interrupted run can leave behind
(half-written content, the replaced old output) sits below it, so a later run that finds the
owner gone (killed with SIGKILL, machine restarted) deletes the whole directory.  A directory
whose owner is alive, runs on another host or in another pid namespace, or has no readable
record is never deleted.

URL outputs (`gs://bucket/dir`, `file:///dir`; see maxnucl.paths).  A bucket has no rename, so
an output cannot appear in one step; instead it is complete exactly when it holds the commit
marker `commit_success.txt` (the file Orbax itself writes last into every checkpoint it
finishes), and readers (`maxnucl.checkpoints.load`, `resolve`, the converter and the pruner)
refuse a URL checkpoint without it ("incomplete (no commit marker ...)").  `TemporaryOutput`
builds the output under the temporary sibling prefix `.NAME.tmp-XXXXXXXX/content/` as for a
local path, and `publish` then
  1. records `publishing` in the temporary prefix (the content is complete from here on);
  2. with --overwrite, deletes the old output: its marker first, then everything else (from
     here until step 3 ends no complete output exists at NAME, which its missing marker says;
     the new one is whole under the temporary prefix);
  3. copies every file of the content to NAME (within a bucket a server-side copy), the
     marker last;
  4. deletes the temporary prefix (owner record last).
An error (or Ctrl-C, SIGTERM) during 2-3 removes what was copied.  A run killed during 2-3
leaves NAME without a marker and the temporary prefix with its `publishing` record; the next
run for NAME (`remove_stale_temporaries`) finishes the publication from there before anything
else.  An output that appears at NAME while the run works is detected before step 2 (refused
without --overwrite) but not made impossible: two writers of one URL at once are not
supported.  Aliasing checks compare normalised URLs (`paths.url_key`): an output equal to or
under an input (or containing one, when it replaces a whole directory) is refused, a local path
and the file:// URL of the same directory included.  Writability of a bucket is not checked in
advance (it shows at the first write).

A single file (a report, results.json) is written to a temporary sibling `.NAME.tmp-PID-START-HOST`
(the writer's pid, its start time and host: `temporary_sibling`), fsynced and renamed over NAME;
an error removes the temporary, and the next write of NAME removes those whose process is gone.

A write that fails for lack of space (ENOSPC, EDQUOT, EFBIG: a full disk, a quota, a file size
limit) is a failure while working, not bad input: the commands report it as one line naming the
file being written and exit 1 (`failed_writes_raised`, `WriteFailed`), and
`hide_failed_write_noise` drops the tracebacks that Orbax's background writers, asyncio and
TensorStore print for each failed write of the same save.

Only the standard library for local paths: the data pipeline (numpy only) uses this module too;
etils is imported (by maxnucl.paths) only when a URL is given.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import itertools
import json
import logging
import os
import pathlib
import re
import signal
import socket
import sys
import time
import uuid
from typing import Any, BinaryIO, Callable, Mapping, Optional, Sequence

from maxnucl import paths

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
CONTENT = "content"
COMMIT_MARKER = "commit_success.txt"  # Orbax's name: a URL output is complete once it holds it
PUBLISHING = "publishing"  # in a URL output's temporary prefix: its content is complete


class OutputPathError(ValueError):
  """An output path that would destroy or alter an input, or that cannot be written."""


# ---- output paths ---------------------------------------------------------------------------------

def check_output_path(output: str | os.PathLike, inputs: Mapping[str, Any], *,
                      flag: str = "--output", overwrite: Optional[bool] = False,
                      replaces: bool = True) -> paths.Path:
  """Validate the output directory `output` before any work; returns it as an absolute path
  (`paths.as_path`: an epath path for a URL).

  inputs: {what: path} of what the tool reads, e.g. {"input checkpoint": ckpt} (None values are
  skipped).  Raises OutputPathError naming both paths when `output` is an input or lies inside
  one, or, if `replaces` (--overwrite replaces the output directory as a whole), contains one
  (replacing it would delete the input).  Paths are compared with symlinks resolved (the path's
  own and its parents') and, where they exist, by device and inode, so a symlink or bind mount
  aliasing an input is recognised; where a URL is involved, by normalised URL
  (`paths.url_key`).  Also refuses a local output whose nearest existing ancestor is not a
  writable directory.  overwrite=False: an existing output is refused (FileExistsError); True:
  allowed; None: not checked (tools that write into, or resume, a directory).
  """
  output = paths.as_path(output)
  _refuse_inputs(output, inputs, flag, replaces)
  exists = paths.exists(output)
  if exists and overwrite is False:
    raise FileExistsError(f"output {output} already exists; pass --overwrite (overwrite=True) "
                          f"to replace it")
  if not paths.is_url(output):
    # A replaced output is renamed within its parent; any other is written into.
    _check_writable(output, output if exists and not replaces else output.parent, flag)
  return output


def check_output_file(path: str | os.PathLike, inputs: Mapping[str, Any], *,
                      flag: str) -> paths.Path:
  """Validate an output file (e.g. a JSON report) before any work; returns its absolute path.

  Refuses a path that is one of `inputs` or lies inside one (see `check_output_path`), an
  existing directory, a directory that does not exist or is not writable, and an existing file
  that is not writable (OutputPathError, naming the path; for a URL only the first two)."""
  path = paths.as_path(path)
  _refuse_inputs(path, inputs, flag, replaces=False)
  if path.is_dir():
    raise OutputPathError(f"{flag} {path} is a directory; expected the path of a file to write")
  if paths.is_url(path):
    return path
  if not path.parent.is_dir():
    raise OutputPathError(f"{flag} {path}: directory {path.parent} does not exist")
  if not os.access(path.parent, os.W_OK | os.X_OK):
    raise OutputPathError(f"{flag} {path}: directory {path.parent} is not writable")
  if path.exists() and not os.access(path, os.W_OK):
    raise OutputPathError(f"{flag} {path} exists and is not writable")
  return path


def _refuse_inputs(output: paths.Path, inputs: Mapping[str, Any], flag: str,
                   replaces: bool) -> None:
  for what, source in inputs.items():
    if source is None:
      continue
    source = paths.as_path(source)
    if paths.is_url(output) or paths.is_url(source):
      out_key, source_key = paths.url_key(output), paths.url_key(source)
      inside, same = paths.key_within(out_key, source_key), out_key == source_key
      contains = paths.key_within(source_key, out_key)
    else:
      inside = _within(output, source)
      same = inside and _same(output, source)
      contains = _within(source, output)
    if same:
      relation, why = "is", "choose another path"
    elif inside:
      relation, why = "lies inside", "writing there would add files to it; choose a path outside it"
    elif replaces and contains:
      relation, why = "contains", f"replacing {flag} would delete it; choose another path"
    else:
      continue
    raise OutputPathError(f"{flag} {output}{_resolved(output)} {relation} the {what} "
                          f"{source}{_resolved(source)}: {why}")


def _resolved(path: paths.Path) -> str:
  if paths.is_url(path):
    return ""
  real = path.resolve()
  return "" if real == path else f" (resolves to {real})"


def _identity(path: pathlib.Path) -> Optional[tuple[int, int]]:
  try:
    stat = os.stat(path)
  except OSError:
    return None
  return stat.st_dev, stat.st_ino


def _same(a: pathlib.Path, b: pathlib.Path) -> bool:
  return a.resolve() == b.resolve() or (_identity(a) is not None and _identity(a) == _identity(b))


def _within(inner: pathlib.Path, outer: pathlib.Path) -> bool:
  """Whether `inner` is `outer` or lies below it, symlinks resolved (by device and inode where
  both exist, which also sees bind mounts)."""
  inner, outer = inner.resolve(), outer.resolve()
  if inner == outer or outer in inner.parents:
    return True
  target = _identity(outer)
  return target is not None and any(_identity(p) == target for p in (inner, *inner.parents))


def _check_writable(path: pathlib.Path, start: pathlib.Path, flag: str) -> None:
  existing = start
  while not existing.exists():  # directories still to create are created in the nearest one
    existing = existing.parent
  if not existing.is_dir():
    raise OutputPathError(f"{flag} {path}: {existing} is not a directory")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise OutputPathError(f"{flag} {path}: directory {existing} is not writable")


# ---- temporary output directories ---------------------------------------------------------------

class TemporaryOutput:
  """A temporary sibling directory of the output `path`, owned by this process.

      with TemporaryOutput(path, overwrite) as tmp:   # tmp: the directory to build the output in
        ...                                           # then: put at `path` (replace_directory,
                                                      # or publish for a URL)
                                                      # an exception: everything removed

  Creating one first removes the stale temporaries of `path` (`remove_stale_temporaries`).
  `commit()` / `discard()` do the same as leaving the block without / with an exception.
  make_content=False: `tmp` is not created (for a writer that insists on creating it, Orbax).
  """

  def __init__(self, path: str | os.PathLike, overwrite: bool = False, *,
               make_content: bool = True):
    self.path = paths.as_path(path)
    self.overwrite = overwrite
    remove_stale_temporaries(self.path)
    if not overwrite and paths.exists(self.path):  # checked again when it is put in place
      raise FileExistsError(f"output {self.path} already exists; pass --overwrite "
                            f"(overwrite=True) to replace it")
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.root = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
    self.root.mkdir()
    (self.root / OWNER_FILE).write_text(json.dumps(_owner_record()))
    self.content = self.root / CONTENT
    if make_content:
      self.content.mkdir()

  def __enter__(self) -> paths.Path:
    return self.content

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.commit()
    else:
      self.discard()

  def commit(self) -> paths.Path:
    """Put the finished content at `path` (see `replace_directory`; `publish` for a URL), then
    delete the rest."""
    try:
      if paths.is_url(self.path):
        publish(self.content, self.path, self.overwrite, record=self.root / PUBLISHING)
      else:
        replace_directory(self.content, self.path, self.overwrite, old=self.root / "old")
    finally:
      self.discard()
    return self.path

  def discard(self) -> None:
    _remove_temporary(self.root)


def publish(content: paths.Path, path: paths.Path, overwrite: bool, *,
            record: Optional[paths.Path] = None, last: Sequence[str] = ()) -> None:
  """Put the finished directory `content` at the URL `path` by copying it, the files named in
  `last` after the others (in that order), the commit marker `COMMIT_MARKER` last of all
  (written if `content` has none); an existing `path` only if `overwrite` (deleted first, its
  marker before anything else).  `record`: where to note, before anything at `path` changes,
  that `content` is complete (see the module docstring).  An exception while
  copying removes what was copied (a process killed meanwhile leaves it to
  `remove_stale_temporaries` of the next run).  `content` is left as it is."""
  if paths.exists(path):
    if not overwrite:
      raise FileExistsError(f"output {path} appeared while it was being written; it is left "
                            f"as it is")
  if record is not None:
    record.write_text(json.dumps({"output": str(path)}))
  try:
    if paths.exists(path):
      (path / COMMIT_MARKER).unlink(missing_ok=True)  # from here on, readers see it incomplete
      paths.remove_tree(path)
    _copy_unmarked(content, path, last)
    if (content / COMMIT_MARKER).exists():
      paths.copy_file(content / COMMIT_MARKER, path / COMMIT_MARKER)
    else:
      (path / COMMIT_MARKER).write_text(f"maxnucl output committed to {path}")
  except BaseException:  # an error or Ctrl-C / SIGTERM: leave nothing half-published
    if not is_committed(path):
      paths.remove_tree(path)
    raise


def _copy_unmarked(source: paths.Path, target: paths.Path, last: Sequence[str] = ()) -> None:
  """Copy every file below the directory `source` to `target`, except its commit marker; the
  files named in `last` (top-level names) after the others, in that order."""
  files = paths.files_below(source)
  order = {(name,): i + 1 for i, name in enumerate(last)}
  for parts in sorted(files, key=lambda p: order.get(p, 0)):  # stable: the rest stay sorted
    if parts != (COMMIT_MARKER,):
      (target.joinpath(*parts)).parent.mkdir(parents=True, exist_ok=True)
      paths.copy_file(source.joinpath(*parts), target.joinpath(*parts))


def move_aside(directory: str | os.PathLike, name: str) -> paths.Path:
  """Move the directory `directory` to the first free sibling name among `name`, `name.2`,
  `name.3`, ...; returns where it went.

  A local directory moves by one rename (that refuses to replace what appeared meanwhile).  A
  bucket has no rename, and its "rename" (copy and delete object by object) killed half-way
  could lose the only copy; so a URL is copied, the copy marked complete by its commit marker
  (written last), and only then is the original deleted, its own marker first (from there on it
  is no longer a finished directory).  An error while copying removes the partial copy and a
  process killed then leaves it without a marker: either way the original stays whole."""
  directory = paths.as_path(directory)
  for number in itertools.count(1):
    target = directory.with_name(name if number == 1 else f"{name}.{number}")
    if paths.exists(target):
      continue
    if paths.is_url(directory):
      break
    try:
      if not _renameat2(directory, target, _RENAME_NOREPLACE):
        os.rename(directory, target)
    except OSError:
      if paths.exists(target):  # taken meanwhile: the next name
        continue
      raise
    _fsync_directory(target.parent)
    return target
  try:
    _copy_unmarked(directory, target)
    (target / COMMIT_MARKER).write_text(f"complete copy of {directory}")
  except BaseException:  # an error or Ctrl-C / SIGTERM: the original is the only copy
    if not is_committed(target):
      paths.remove_tree(target)
    raise
  (directory / COMMIT_MARKER).unlink(missing_ok=True)
  paths.remove_tree(directory)
  return target


def is_committed(path: paths.Path) -> bool:
  """Whether the URL output `path` holds its commit marker (see the module docstring)."""
  return (path / COMMIT_MARKER).exists()


def replace_directory(tmp: str | os.PathLike, path: str | os.PathLike, overwrite: bool, *,
                      old: Optional[str | os.PathLike] = None) -> None:
  """Put the finished directory `tmp` at `path`; an existing `path` only if `overwrite`.

  A new `path` is made by one rename that fails, rather than replace it, if `path` appeared
  meanwhile (renameat2 RENAME_NOREPLACE).  An existing `path` is swapped with `tmp` by one
  renameat2(RENAME_EXCHANGE) (Linux >= 3.15, on filesystems that support it), so that `path`
  names the old or the new directory at every instant; the old one, now at `tmp`, is then
  deleted.  Where the exchange is not available: two renames, `path` to `old` (default: the
  sibling `.NAME.old-XXXXXXXX`; TemporaryOutput passes `old/` inside its own directory, which
  `remove_stale_temporaries` moves back to `path` if the process was killed in between) and
  `tmp` to `path`; between the two, `path` does not exist.
  """
  tmp, path = pathlib.Path(tmp), pathlib.Path(path)
  if not os.path.lexists(path):
    try:
      if not _renameat2(tmp, path, _RENAME_NOREPLACE):
        os.rename(tmp, path)
    except FileExistsError:
      raise FileExistsError(f"output {path} appeared while it was being written; it is left "
                            f"as it is") from None
    _fsync_directory(path.parent)
    return
  if not overwrite:
    raise FileExistsError(f"output {path} already exists; pass --overwrite to replace it")
  if _renameat2(tmp, path, _RENAME_EXCHANGE):
    replaced = tmp
  else:
    replaced = pathlib.Path(old) if old is not None else (
        path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(path, replaced)
    os.rename(tmp, path)  # until this returns, `path` does not exist
  _fsync_directory(path.parent)
  _remove(replaced)


_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


@functools.lru_cache(maxsize=None)
def _libc_renameat2():
  try:
    fn = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):  # not glibc >= 2.28 (or not Linux)
    return None
  fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  fn.restype = ctypes.c_int
  return fn


def _renameat2(src: pathlib.Path, dst: pathlib.Path, flags: int) -> bool:
  """renameat2(2) with `flags`; False where the C library, kernel or filesystem lacks it."""
  fn = _libc_renameat2()
  if fn is None:
    return False
  if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
    return False
  raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _fsync_directory(directory: pathlib.Path) -> None:
  """Make a rename in `directory` durable."""
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _remove(path: paths.Path) -> None:
  paths.remove_tree(path)


def _remove_temporary(root: paths.Path) -> None:
  """Delete a temporary directory, its owner record last: a run killed meanwhile leaves a
  directory that the next run still recognises as stale."""
  if root.is_dir() and (paths.is_url(root) or not root.is_symlink()):
    for child in root.iterdir():
      if child.name != OWNER_FILE:
        _remove(child)
  (root / OWNER_FILE).unlink(missing_ok=True)
  _remove(root)


# ---- stale temporaries ----------------------------------------------------------------------------

def remove_stale_temporaries(path: str | os.PathLike) -> list[paths.Path]:
  """Delete the temporary siblings `.NAME.tmp-*` of the output `path` whose owner process is
  gone; returns those deleted.  (One holding the previous output as `old/` while `path` is
  missing, a run killed between the two renames of `replace_directory`'s fallback, first gets
  it moved back to `path`; for a URL, one whose publication was interrupted, `publishing`
  recorded and `path` without its commit marker, first gets it finished.)  Those whose owner may
  be alive (or runs on another host or in another pid namespace) are left alone, and so are
  those without a readable owner record (made by an older maxnucl, or by a run killed in the
  instant between creating the directory and recording its owner), with a warning that names
  them."""
  path = paths.as_path(path)
  url = paths.is_url(path)
  removed: list[paths.Path] = []
  if not path.parent.is_dir():
    return removed
  for candidate in sorted(path.parent.glob(glob.escape(f".{path.name}.tmp-") + "*")):
    if (not url and candidate.is_symlink()) or not candidate.is_dir():
      continue
    try:
      owner = json.loads((candidate / OWNER_FILE).read_text())
      if not isinstance(owner, dict):
        raise ValueError(owner)
    except (OSError, ValueError):
      log.warning("%s: a temporary directory of %s without an owner record (%s); it is not "
                  "removed automatically: delete it once no process is writing it", candidate,
                  path, OWNER_FILE)
      continue
    if _owner_alive(owner):
      continue
    log.warning("removing %s: temporary directory of %s left by process %s (%s), which is gone",
                candidate, path, owner.get("pid"), str(owner.get("argv", "?"))[:300])
    if url and (candidate / PUBLISHING).exists() and not is_committed(path):
      # killed while publishing: the content is complete, `path` is not
      publish(candidate / CONTENT, path, overwrite=True)
      log.warning("finished publishing %s from %s", path, candidate / CONTENT)
    elif not url and os.path.lexists(candidate / "old") and not os.path.lexists(path):
      # killed between the two renames of replace_directory's fallback: the old output is whole
      try:
        os.rename(candidate / "old", path)
        log.warning("restored the previous %s from %s", path, candidate / "old")
      except OSError:  # another run restored it first
        pass
    _remove_temporary(candidate)
    removed.append(candidate)
  return removed


def _owner_record() -> dict:
  pid = os.getpid()
  return {"pid": pid, "start_time": _process_start_time(pid), "boot_id": _boot_id(),
          "hostname": socket.gethostname(), "pid_namespace": _pid_namespace(),
          "created": time.time(), "argv": sys.argv}


def _owner_alive(owner: dict) -> bool:
  """Whether the process that wrote `owner` may still run (True when this cannot be told)."""
  if owner.get("hostname") != socket.gethostname() or owner.get("pid_namespace") != _pid_namespace():
    return True  # another machine or container: its processes are not visible from here
  boot_id = _boot_id()
  if owner.get("boot_id") and boot_id and owner["boot_id"] != boot_id:
    return False  # the machine restarted since
  pid = owner.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return True
  if os.path.exists("/proc/self/stat"):  # the start time tells a reused pid apart
    try:
      start = _process_start_time(pid)
    except (ValueError, IndexError):  # an unexpected /proc format: keep it
      return True
    return start is not None and owner.get("start_time") in (None, start)
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _process_start_time(pid: int) -> Optional[int]:
  """Start time (clock ticks after boot) of a running process; None if none or a zombie."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3
  return None if fields[0] in ("Z", "X") else int(fields[19])  # starttime is field 22


def _boot_id() -> Optional[str]:
  try:
    return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
  except OSError:
    return None


def _pid_namespace() -> Optional[str]:
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return None


# ---- single files --------------------------------------------------------------------------------

def temporary_sibling(path: str | os.PathLike) -> pathlib.Path:
  """The temporary file `.NAME.tmp-PID-START-HOST` beside `path` of this process (pid, process
  start time, host), where `write_file_atomically` writes `path`."""
  path = pathlib.Path(path)
  pid = os.getpid()
  return path.with_name(f".{path.name}.tmp-{pid}-{_process_start_time(pid) or 0}-"
                        f"{socket.gethostname()}")


def write_file_atomically(path: str | os.PathLike, text: str) -> None:
  """Replace the file `path` by `text` (UTF-8) in one step (`write_atomically`)."""
  write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
  """Replace the file `path` by what `write(f)` writes to the binary file `f`, in one step:
  written to `temporary_sibling(path)`, fsynced, renamed over `path` (a URL: written at once; an
  object appears whole).  An error leaves `path` as it was and removes the temporary (an
  OSError names `path`).  The temporaries of `path` that processes now gone left behind are
  removed first (`remove_stale_files`)."""
  if paths.is_url(path):
    with paths.as_path(path).open("wb") as f:
      write(f)
    return
  path = pathlib.Path(path)
  remove_stale_files(path)
  tmp = temporary_sibling(path)
  try:
    with naming_errors(path), tmp.open("wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


class WriteOnly:
  """A file seen through its `write` alone, for numpy's writers: `np.save` writes an array to a
  real file with `tofile`, whose failure on a full disk carries no errno ("N requested and M
  written"); through `write` it is the OSError ENOSPC that names the problem."""

  def __init__(self, f):
    self.write = f.write


def remove_stale_files(path: str | os.PathLike) -> list[pathlib.Path]:
  """Delete the temporaries `.NAME.tmp-PID-START-HOST` of the file `path` whose process is gone
  (killed while writing it); returns those deleted.  Those of a live process, of another host,
  or without a recognisable name are left alone."""
  path = pathlib.Path(path)
  pattern = re.compile(re.escape(f".{path.name}.tmp-") + r"(\d+)-(\d+)-(.+)")
  removed = []
  if not path.parent.is_dir():
    return removed
  for candidate in path.parent.glob(glob.escape(f".{path.name}.tmp-") + "*"):
    match = pattern.fullmatch(candidate.name)
    if match is None or candidate.is_dir():
      continue
    pid, start, host = int(match[1]), int(match[2]), match[3]
    owner = {"pid": pid, "start_time": start or None, "hostname": host,
             "pid_namespace": _pid_namespace()}  # the name does not say; taken to be this one
    if not _owner_alive(owner):
      log.warning("removing %s: temporary file of %s left by process %d, which is gone",
                  candidate, path, pid)
      candidate.unlink(missing_ok=True)
      removed.append(candidate)
  return removed


@contextlib.contextmanager
def naming_errors(path: str | os.PathLike):
  """An OSError raised inside without a file name (a failed write(), flush() or fsync()) is
  raised again naming `path`."""
  try:
    yield
  except OSError as e:
    if e.filename is not None or e.errno is None:
      raise
    raise OSError(e.errno, e.strerror, str(path)) from e


# ---- writes that fail while working --------------------------------------------------------------

OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# TensorStore (Orbax's writer) reports an OS error as text: `... [os_error_code='28']`
_ERROR_CODE = re.compile(r"os_error_code=\\?'?(\d+)|\[Errno (\d+)\]")
_WRITTEN_FILE = (re.compile(r'local file "([^"]+)"'), re.compile(r'Failed writing: "([^"]+)"'),
                 # an OSError's text, as gin re-raises it (a copy without errno or filename)
                 re.compile(r"\[Errno \d+\] [^:\n]*: '([^'\n]+)'"))
_TEMPORARY_CONTENT = re.compile(r"(.*)/\.([^/]+)\.tmp-[0-9a-f]{8}/content(/.*)?")


class WriteFailed(Exception):
  """Writing an output failed while working for lack of space (not bad input: a command exits 1
  with this message, one line naming the file)."""


def write_failure(error: BaseException, target: Any = None) -> Optional[str]:
  """The one line "<strerror> while writing FILE; ..." when `error`, or an error it was raised
  from or during, is a write that failed for lack of space (`OUT_OF_SPACE`, as an OSError's errno or in
  TensorStore's message); None for any other error.  FILE: the one the error names, else
  `target` (the command's output)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    code, written = _out_of_space(error)
    if code is not None:
      written = written or (str(target) if target is not None else "the output")
      whole = _TEMPORARY_CONTENT.fullmatch(written)
      where = f" (the temporary output of {whole[1]}/{whole[2]})" if whole else ""
      return (f"{os.strerror(code)} while writing {written}{where}; free some space and run the "
              f"command again")
    error = error.__cause__ or error.__context__
  return None


def _out_of_space(error: BaseException) -> tuple[Optional[int], Optional[str]]:
  """(errno, file written) of an out-of-space error, else (None, None)."""
  if isinstance(error, OSError) and error.errno is not None:
    if error.errno not in OUT_OF_SPACE:
      return None, None
    name = error.filename
    return error.errno, None if name is None else os.fsdecode(name)
  return _out_of_space_in_text(str(error))


def _out_of_space_in_text(text: str) -> tuple[Optional[int], Optional[str]]:
  codes = [int(a or b) for a, b in _ERROR_CODE.findall(text)]
  code = next((c for c in codes if c in OUT_OF_SPACE), None)
  if code is None:
    return None, None
  found = (pattern.search(text) for pattern in _WRITTEN_FILE)
  return code, next((m[1] for m in found if m), None)


@contextlib.contextmanager
def failed_writes_raised(target: Any = None):
  """An error inside that is a write failed for lack of space (`write_failure`) is raised again
  as WriteFailed with its one-line message; `target`: what to name when the error names no
  file (the command's output)."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise ValueError, Python OSError
    message = write_failure(e, target)
    if message is None:
      raise
    raise WriteFailed(message) from e


class _FailedWriteLogs(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and record.exc_info[1] is not None and write_failure(record.exc_info[1]):
      return False
    try:
      text = record.getMessage()
    except (TypeError, ValueError):
      return True
    return _out_of_space_in_text(text)[0] is None


def hide_failed_write_noise() -> None:
  """Drop what a save that failed for lack of space prints besides the command's own one line
  (`failed_writes_raised`): on the root logger's handlers, the records about such writes
  (Orbax's background threads log each failed write of a save with its traceback, some 460
  lines for one checkpoint, and asyncio each failed task at exit), and the "Event loop is
  closed" tracebacks of TensorStore's callbacks for writes that finish after the failed save
  closed its event loop (a result nobody waits for).  Call after logging is configured."""
  for handler in logging.getLogger().handlers:
    if not any(isinstance(f, _FailedWriteLogs) for f in handler.filters):
      handler.addFilter(_FailedWriteLogs())
  if not getattr(sys.unraisablehook, "hides_closed_loop_callbacks", False):
    sys.unraisablehook = _hiding_closed_loop_callbacks(sys.unraisablehook)


def _hiding_closed_loop_callbacks(hook):
  def unraisable(info):
    if not (info.object is None and isinstance(info.exc_value, RuntimeError)
            and str(info.exc_value) == "Event loop is closed"):
      hook(info)

  unraisable.hides_closed_loop_callbacks = True
  return unraisable


# ---- signals ----------------------------------------------------------------------------------

def exit_on_sigterm() -> None:
  """Make SIGTERM end a command line the way Ctrl-C (SIGINT) does: an exception unwinds the
  `with` blocks, which remove temporary outputs, and the process exits with status 143
  (128 + SIGTERM).  A second SIGTERM ends it at once.  Call from the main thread."""
  def terminate(signum, frame):
    del frame
    signal.signal(signum, signal.SIG_DFL)
    raise SystemExit(128 + signum)

  signal.signal(signal.SIGTERM, terminate)
