"""The evaluator's side of one run: starts the launcher, reads its pipes (stdout, stderr, the
completion pipe, the launcher's reports) with caps, enforces the wall-clock timeout and the
output cap, and removes the work directory.  Imports only the standard library, the modules only
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
# CPython 3.11's AST constructor keeps its recursion depth in interpreter-wide state: two threads
# parsing at once (check_program calls run in a thread pool) can fail with "SystemError: AST
# constructor recursion depth mismatch".  The evaluator parses the launchers' reports under this
# lock (_thread: built in, nothing imported at a sandboxed program's start-up).
_AST_LOCK = _thread.allocate_lock()


class Run:
  """What the evaluator observed of one run."""

  def __init__(self, capture_bytes: int):
    self.stdout = Capture(capture_bytes)
    self.stderr = Capture(capture_bytes)
    self.done = bytearray()  # what arrived on the completion pipe
    self.reports: list[dict] = []  # the launcher's report lines
    self.started = False  # the program's code was about to run
    self.stopped_for: str | None = None  # "timeout" / "output_limit" / "startup": we killed it
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


def start_launcher(config: dict):
  """Starts the launcher in a new session; hands it the config (and so the nonce) through a
  pipe.  Returns (process, done read fd, report read fd)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  config_r, config_w = os.pipe()
  done_r, done_w = os.pipe()
  report_r, report_w = os.pipe()
  config.update(done_fd=done_w, report_fd=report_w)
  try:
    process = subprocess.Popen(
        interpreter_command("launch", config["workdir"], str(config_r)),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        pass_fds=(config_r, done_w, report_w), start_new_session=True,
        env=environment(config["workdir"]), cwd=config["workdir"])
  except BaseException:
    for fd in (config_w, done_r, report_r):
      os.close(fd)
    raise
  finally:
    for fd in (config_r, done_w, report_w):
      os.close(fd)
  try:
    os.write(config_w, marshal.dumps(config))  # a few hundred bytes: never blocks
  except BrokenPipeError:
    pass  # the launcher died at once; its stderr says why
  finally:
    os.close(config_w)
  return process, done_r, report_r


def supervise(launched, timeout_s: float, limits: Limits) -> Run:
  """Reads stdout, stderr, the completion pipe and the launcher's reports until all are closed,
  stopping the run at the wall-clock timeout or when an output stream passes its cap."""
  import selectors  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  process, done_r, report_r = launched
  run = Run(limits.capture_bytes)
  report_buffer = bytearray()
  sinks = {process.stdout.fileno(): run.stdout.add, process.stderr.fileno(): run.stderr.add,
           done_r: run.done.extend, report_r: report_buffer.extend}
  selector = selectors.DefaultSelector()
  for fd in sinks:
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
        chunk = os.read(key.fd, CHUNK)
        if not chunk:
          selector.unregister(key.fd)
          continue
        sinks[key.fd](chunk)
        longest = max(run.stdout.total, run.stderr.total)
        if run.stopped_for is None and longest > limits.output_bytes:
          run.stopped_for = "output_limit"
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


def remove_tree(path: str):
  """Removes the work directory even where the program took the write bit off its folders."""
  import shutil  # pylint: disable=import-outside-toplevel
  def make_writable_and_retry(function, failed_path, _):
    os.chmod(os.path.dirname(failed_path), 0o700)
    function(failed_path)
  shutil.rmtree(path, onerror=make_writable_and_retry)
