"""The evaluator's side of one run: makes the work directory (and sweeps those that evaluators
killed before they could remove theirs), starts the launcher, reads its pipes (stdout, stderr, the
completion pipe, the launcher's reports) each with a cap, so that nothing the sandbox writes can
grow the evaluator's memory, enforces the wall-clock timeout, and removes the work directory.  Imports only the standard library, the modules only
the evaluator needs where they are used (the launcher's interpreter never runs this code)."""

from __future__ import annotations

import _thread
import marshal
import math
import os
import signal
import sys
import time

from .limits import Limits


ENVIRONMENT_PATH = "/usr/local/bin:/usr/bin:/bin"
KILL_GRACE_S = 1.0  # after asking the launcher to clean up, before SIGKILL to its process group
DRAIN_S = 0.5  # after the launcher exited, how long pipes still held by escaped processes are read
CHUNK = 1 << 16
# Past these a stream is runaway output (the run is stopped, status output_limit): the completion
# pipe carries one TOKEN_BYTES token (anything else on it is the program's), the report pipe a few
# short lines from the launcher's own code.
COMPLETION_BYTES = 4096
REPORT_BYTES = 1 << 20
WORKDIR_PREFIX = "maxnucl-sandbox-"
# CPython 3.11's AST constructor keeps its recursion depth in interpreter-wide state: two threads
# parsing at once (check_program calls run in a thread pool) can fail with "SystemError: AST
# constructor recursion depth mismatch".  The evaluator parses the launchers' reports under this
# lock (_thread: built in, nothing imported at a sandboxed program's start-up).
_AST_LOCK = _thread.allocate_lock()


class Run:
  """What the evaluator observed of one run."""

  def __init__(self, capture_bytes: int, token: bytes = b""):
    self.stdout = Capture(capture_bytes)
    self.stderr = Capture(capture_bytes)
    self.completion = TokenWatch(token)  # whether the token arrived on the completion pipe
    self.reports: list[dict] = []  # the launcher's report lines
    self.started = False  # the program's code was about to run
    self.stopped_for: str | None = None  # "timeout" / "output_limit" / "startup": we killed it
    self.overflowed = ""  # with output_limit: which stream passed which cap
    self.launcher_returncode: int | None = None


class Capture:
  """A stream as the result shows it: its first and last `limit / 2` bytes and the count."""

  def __init__(self, limit: int):
    self.half = max(limit // 2, 1)
    self.head = bytearray()
    self.tail = bytearray()
    self.total = 0

  def add(self, chunk: bytes):
    self.total += len(chunk)
    room = self.half - len(self.head)
    if room > 0:
      self.head += chunk[:room]
      chunk = chunk[room:]
    if chunk:
      self.tail += chunk
      del self.tail[:-self.half]

  def text(self) -> str:
    omitted = self.total - len(self.head) - len(self.tail)
    middle = f"\n... [{omitted} bytes omitted] ...\n" if omitted else ""
    return (self.head.decode(errors="replace") + middle + self.tail.decode(errors="replace"))


class TokenWatch:
  """Whether `token` appeared anywhere in a stream, in bounded memory (the last len(token) - 1
  bytes are kept): stray bytes the program wrote to the completion pipe before or after do not
  hide a token the harness wrote."""

  def __init__(self, token: bytes):
    self.token = token
    self.window = b""
    self.seen = False

  def add(self, chunk: bytes):
    if self.seen or not self.token:
      return
    data = self.window + chunk
    self.seen = self.token in data
    self.window = data[len(data) - len(self.token) + 1:]


def interpreter_command(mode: str, *args: str) -> list[str]:
  """`python -I -S -c <bootstrap> <this package's folder> <mode> ...`: a fresh isolated
  interpreter that imports launcher.py (through its bytecode cache) as a submodule of a bare
  package `maxnucl_sandbox` -- neither the maxnucl package nor this package's __init__ runs, nor
  are site-packages' .pth files processed (the program gets site-packages on sys.path later)."""
  bootstrap = ("import sys, types; "
               "package = sys.modules['maxnucl_sandbox'] = types.ModuleType('maxnucl_sandbox'); "
               "package.__path__ = [sys.argv[1]]; "
               "import maxnucl_sandbox.launcher; maxnucl_sandbox.launcher.main(sys.argv[2:])")
  return [sys.executable, "-I", "-S", "-c", bootstrap, os.path.dirname(os.path.abspath(__file__)),
          mode, *args]


def environment(workdir: str) -> dict:
  return {"PATH": ENVIRONMENT_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}


def start_launcher(config: dict, token: bytes):
  """Starts the launcher in a new session; hands it the config through one pipe and the
  completion token through another, which only the program's process reads, into C memory
  (launcher.run_to_completion).  Returns (process, done read fd, report read fd)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  config_r, config_w = os.pipe()
  token_r, token_w = os.pipe()
  done_r, done_w = os.pipe()
  report_r, report_w = os.pipe()
  config.update(token_fd=token_r, done_fd=done_w, report_fd=report_w)
  try:
    process = subprocess.Popen(
        interpreter_command("launch", config["workdir"], str(config_r)),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        pass_fds=(config_r, token_r, done_w, report_w), start_new_session=True,
        env=environment(config["workdir"]), cwd=config["workdir"])
  except BaseException:
    for fd in (config_w, token_w, done_r, report_r):
      os.close(fd)
    raise
  finally:
    for fd in (config_r, token_r, done_w, report_w):
      os.close(fd)
  for fd, data in ((config_w, marshal.dumps(config)), (token_w, token)):
    try:
      os.write(fd, data)  # a few hundred bytes: never blocks
    except BrokenPipeError:
      pass  # the launcher died at once; its stderr says why
    finally:
      os.close(fd)
  return process, done_r, report_r


def supervise(launched, token: bytes, timeout_s: float, limits: Limits) -> Run:
  """Reads stdout, stderr, the completion pipe and the launcher's reports until all are closed,
  stopping the run at the wall-clock timeout or when a stream passes its cap.  Memory stays
  bounded whatever the sandbox writes: each read is at most CHUNK bytes, and what is kept of each
  stream is bounded (Capture, TokenWatch, REPORT_BYTES of reports)."""
  import selectors  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  process, done_r, report_r = launched
  run = Run(limits.capture_bytes, token)
  report_buffer = bytearray()
  streams = {process.stdout.fileno(): _Stream("stdout", run.stdout.add, limits.output_bytes),
             process.stderr.fileno(): _Stream("stderr", run.stderr.add, limits.output_bytes),
             done_r: _Stream("the completion pipe", run.completion.add, COMPLETION_BYTES),
             report_r: _Stream("the launcher's reports", report_buffer.extend, REPORT_BYTES,
                               keep_past_cap=False)}
  selector = selectors.DefaultSelector()
  for fd in streams:
    selector.register(fd, selectors.EVENT_READ)
  deadline = time.monotonic() + limits.startup_timeout_s  # until the program starts
  kill_at = drain_until = math.inf
  try:
    while selector.get_map():
      now = time.monotonic()
      if not run.started and _parse_reports(report_buffer, run):
        deadline = now + timeout_s
      if run.stopped_for is None and now >= deadline:
        run.stopped_for = "timeout" if run.started else "startup"
      if run.stopped_for is not None and deadline != math.inf:
        deadline = math.inf
        _ask_launcher_to_stop(process)
        kill_at = now + KILL_GRACE_S
      if now >= kill_at:
        _kill_group(process)
        kill_at = math.inf
      if drain_until == math.inf and process.poll() is not None:
        drain_until = now + DRAIN_S
      if now >= drain_until:
        break  # only processes that escaped every containment still hold a pipe
      wait = min(deadline, kill_at, drain_until, now + 0.25) - now
      for key, _ in selector.select(timeout=max(wait, 0.0)):
        if not streams[key.fd].read(key.fd, run):
          selector.unregister(key.fd)
  finally:
    selector.close()
    os.close(done_r)
    os.close(report_r)
    process.stdout.close()
    process.stderr.close()
    try:
      run.launcher_returncode = process.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
      _kill_group(process)
      run.launcher_returncode = process.wait()
  _parse_reports(report_buffer, run)
  return run


class _Stream:
  """One pipe from the sandbox: what keeps its bytes (a bounded amount of them), its cap and how
  many arrived; past the cap the run is stopped as output_limit."""

  def __init__(self, name: str, sink, cap: int, keep_past_cap: bool = True):
    self.name, self.sink, self.cap, self.keep_past_cap = name, sink, cap, keep_past_cap
    self.received = 0

  def read(self, fd: int, run: Run) -> bool:
    """Reads one chunk (at most CHUNK bytes) from `fd`; False at its end."""
    chunk = os.read(fd, CHUNK)
    if not chunk:
      return False
    self.received += len(chunk)
    if self.received <= self.cap or self.keep_past_cap:
      self.sink(chunk)
    if self.received > self.cap and run.stopped_for is None:
      run.stopped_for, run.overflowed = "output_limit", f"{self.name} passed {self.cap} bytes"
    return True


def _parse_reports(buffer: bytearray, run: Run) -> bool:
  """Moves the complete lines of `buffer` into run.reports; True once the program started."""
  *lines, rest = bytes(buffer).split(b"\n")
  buffer[:] = rest
  for line in lines:
    report = literal(line.decode())
    run.reports.append(report)
    run.started = run.started or report.get("started", False)
  return run.started


def literal(text: str):
  """ast.literal_eval of a report line, one thread at a time (_AST_LOCK)."""
  import ast  # pylint: disable=import-outside-toplevel
  with _AST_LOCK:
    return ast.literal_eval(text)


def _ask_launcher_to_stop(process):
  """SIGTERM to the launcher: it kills the PID namespace's init (or every descendant) and exits."""
  try:
    process.send_signal(signal.SIGTERM)
  except ProcessLookupError:
    pass


def _kill_group(process):
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def make_workdir() -> str:
  """A fresh temporary directory whose name records this process's PID namespace and pid, so
  that `sweep_stale_workdirs` can tell when its evaluator is gone."""
  import tempfile  # pylint: disable=import-outside-toplevel
  return tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{_pid_namespace()}-{os.getpid()}-")


def sweep_stale_workdirs(directory: str) -> list[str]:
  """Removes the work directories in `directory` that an evaluator killed mid-run (SIGKILL, OOM)
  left behind: only directories (not links) of this user, named by `make_workdir` in this PID
  namespace, whose evaluator process no longer exists.  Returns the paths removed."""
  removed = []
  try:
    entries = os.listdir(directory)
  except OSError:
    return removed
  for entry in entries:
    owner = _workdir_owner(entry)
    path = os.path.join(directory, entry)
    if owner is None or owner[0] != _pid_namespace() or _process_exists(owner[1]):
      continue
    try:
      info = os.lstat(path)
      if not os.path.isdir(path) or os.path.islink(path) or info.st_uid != os.getuid():
        continue
      remove_tree(path)
      removed.append(path)
    except OSError:
      continue  # another evaluator swept it first, or it is not ours to remove
  return removed


def _workdir_owner(name: str) -> tuple[int, int] | None:
  """(PID namespace, pid) from a name `make_workdir` gave; None for any other name."""
  if not name.startswith(WORKDIR_PREFIX):
    return None
  fields = name[len(WORKDIR_PREFIX):].split("-", 2)
  if len(fields) != 3 or not (fields[0].isdigit() and fields[1].isdigit()):
    return None
  return int(fields[0]), int(fields[1])


def _pid_namespace() -> int:
  try:
    return os.stat("/proc/self/ns/pid").st_ino
  except OSError:
    return 0


def _process_exists(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # another user's
  return True


def remove_tree(path: str):
  """Removes the work directory even where the program took the write bit off its folders."""
  import shutil  # pylint: disable=import-outside-toplevel
  def make_writable_and_retry(function, failed_path, _):
    os.chmod(os.path.dirname(failed_path), 0o700)
    function(failed_path)
  shutil.rmtree(path, onerror=make_writable_and_retry)
