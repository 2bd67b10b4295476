"""Sandboxed execution of untrusted, model-written Python programs (MBPP pass@1).

`check_program(program)` runs one program -- a model's solution followed by the benchmark's test
asserts -- and says whether its tests ran to their end; `check_programs` runs many in parallel.
The programs are untrusted: a model may write an infinite loop, a fork bomb, `shutil.rmtree`, a
socket, gigabytes of output or a detached daemon, by accident or because it learnt that exiting
early "passes".  Each run is contained with the kernel's unprivileged facilities and every
facility actually in force is reported in `result["containment"]`.

Process tree of one run

    evaluator (this process): writes the program into a fresh temporary directory, reads the
     |  pipes with caps, enforces the wall-clock timeout, classifies the outcome, removes the dir
     +- launcher  `python -I -S -c <bootstrap>`, a new session: unshares a user namespace (uid 0
         |        in it is the caller's uid outside) and a PID namespace; kills what is left at the
         |        end, also when the evaluator dies (parent-death signal)
         +- init  PID 1 of the new PID namespace: new mount, network, IPC and UTS namespaces; a
             |    fresh /proc, every mount read-only, a size-capped tmpfs on the work directory;
             |    reaps orphans and reports the program's exit status.  When it exits the kernel
             |    kills every process of the namespace -- daemons that called setsid() included.
             +- program  rlimits, no capabilities, no_new_privs, Landlock, seccomp; then runs the
                         program's code object in this same interpreter (no second start-up).

Containment, each layer independent of the others
  * rlimits: RLIMIT_CPU (the timeout rounded up, +1 s), RLIMIT_AS (`Limits.memory_bytes`, 1 GiB),
    RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_NPROC, RLIMIT_CORE = 0.  The kernel exempts the host's
    root from RLIMIT_NPROC, so an evaluator running as root gives the program the real uid
    PROGRAM_UID (seccomp keeps it from changing back); a fork bomb then meets the limit.
  * files: Landlock lets the program read and execute everywhere but write, create, rename or
    remove only beneath its work directory (and write /dev/null); independently the mount
    namespace makes every mount read-only (which also stops chmod, chown and utime, which
    Landlock does not cover) and puts a tmpfs of `Limits.disk_bytes` on the work directory, so
    the disk cannot be filled either.
  * network: an empty network namespace (not even loopback is up); Landlock (ABI >= 4) denies
    every TCP bind and connect; seccomp allows socket() only for AF_INET/AF_INET6, because a
    pathname AF_UNIX socket (e.g. a container runtime's) is reached through the file system and
    Landlock does not cover connecting to one.
  * processes: the PID namespace hides and protects every process outside it; Landlock (ABI >= 6)
    scopes signals and abstract unix sockets to the sandbox; seccomp denies ptrace, new
    namespaces, mounts, io_uring, bpf, keyrings, set*id and similar kernel surface; all
    capabilities are dropped (the user namespace's included) and no_new_privs is set.
  * output: stdout and stderr are pipes read with a cap; past `Limits.output_bytes` the run is
    killed.  stdin is /dev/null; the environment is PATH, HOME, TMPDIR and LANG only.  The
    program sees the standard library and site-packages (but no .pth file is processed).
  * cleanup: at the end (normal, timeout, cap) the PID namespace's init exits, which kills all
    that the program started.  Where no PID namespace can be had, the launcher is a child
    subreaper and kills every descendant it finds in /proc.  The temporary directory is removed.

A facility the kernel refuses is reported as inactive (with the reason under "unavailable") and the
run goes on with the others; `containment_available()` says what this machine offers.

Completion check.  A program passes only if its code object returned normally and then its
process wrote a per-run random nonce (never on the command line nor in the environment) to a
pipe; `sys.exit(0)`, `os._exit(0)`, `raise SystemExit` or a signal before the end of the asserts
leaves the nonce unwritten (status "early_exit" when the exit code is 0).  Residual risk: the
nonce lives in the program's own interpreter, so a program written *against this harness* could
find it (frame or gc introspection, /proc/self/mem) and the pipe's fd and fake completion; a
model's solution that merely exits early, swallows its own exceptions or kills itself cannot.

Why ctypes and not a library: the PyPI `landlock` package (1.0.0.dev5, alpha, one maintainer)
covers file-system rules only, up to ABI 5 -- no network rules (ABI 4) and no signal/socket scopes
(ABI 6) -- and `pyseccomp` (0.1.2, 2021) is an unmaintained ctypes wrapper.  Landlock is three
syscalls with fixed numbers on every architecture, so they are called directly here; seccomp
filters are built by the maintained C library libseccomp (libseccomp.so.2, which apt itself
depends on), loaded with ctypes, so the filter is correct for the machine's architecture.
`os.unshare` only exists from Python 3.12, hence libc's unshare through ctypes too.

This module imports only the standard library: the launcher loads it by path, before any
containment, in a fresh `python -I -S` interpreter for every program, so the modules only the
evaluator needs (subprocess, selectors, tempfile, concurrent.futures) are imported where used:
each import at the top would add to every program's start-up.
"""

from __future__ import annotations

import _thread
import builtins
import collections
import ctypes
import errno
import functools
import marshal
import math
import os
import resource
import signal
import sys
import time
import types
from collections.abc import Iterable

DEFAULT_TIMEOUT_S = 3.0
STATUSES = ("passed", "failed", "early_exit", "timeout", "memory", "killed", "output_limit",
            "sandbox_error")
# What `check_program(disable=...)` may switch off (to exercise and test the fallbacks).
FACILITIES = ("user_namespace", "pid_namespace", "mount_namespace", "network_namespace",
              "ipc_namespace", "landlock", "seccomp")
PROGRAM_NAME = "program.py"
PROGRAM_UID = 65534  # the program's real uid when the evaluator is root (_enter_user_namespace)
ENVIRONMENT_PATH = "/usr/local/bin:/usr/bin:/bin"
KILL_GRACE_S = 1.0  # after asking the launcher to clean up, before SIGKILL to its process group
DRAIN_S = 0.5  # after the launcher exited, how long pipes still held by escaped processes are read
_CHUNK = 1 << 16
# CPython 3.11's AST constructor keeps its recursion depth in interpreter-wide state: two threads
# parsing at once (check_program calls run in a thread pool) can fail with "SystemError: AST
# constructor recursion depth mismatch".  The evaluator parses the launchers' reports under this
# lock (_thread: built in, nothing imported at a sandboxed program's start-up).
_AST_LOCK = _thread.allocate_lock()


class SandboxError(RuntimeError):
  """The sandbox itself (not the program) could not be set up."""


LIMIT_DEFAULTS = {
    "memory_bytes": 1 << 30,  # RLIMIT_AS (address space)
    "file_bytes": 16 << 20,  # RLIMIT_FSIZE: the largest file the program may write
    "disk_bytes": 64 << 20,  # size of the tmpfs work directory: all files together
    "processes": 16,  # RLIMIT_NPROC: the program's tasks (processes and threads) together
    "open_files": 64,  # RLIMIT_NOFILE
    "output_bytes": 1 << 20,  # stdout or stderr past this is runaway output: the run is killed
    "capture_bytes": 64 << 10,  # kept of each stream in the result (its head and its tail)
    "startup_timeout_s": 10.0,  # for the sandbox's own set-up, before the program's clock
}


class Limits(collections.namedtuple("Limits", LIMIT_DEFAULTS, defaults=LIMIT_DEFAULTS.values())):
  """Resource limits of one run (names and defaults: LIMIT_DEFAULTS); rlimits apply to each
  process the program starts, so a run may use at most processes x memory_bytes (16 GiB by
  default; no cgroup bounds the sum).  A namedtuple, not a dataclass: the launcher imports this
  module for every program, and dataclasses (or typing) would add 4-7 ms to each."""
  __slots__ = ()

  def validated(self) -> "Limits":
    for name, value in self._asdict().items():
      if not value > 0:
        raise ValueError(f"Limits.{name} = {value}; expected > 0")
    return self


# ---- the evaluator's side -------------------------------------------------------------------


def check_program(program: str, timeout_s: float = DEFAULT_TIMEOUT_S, *,
                  limits: Limits | None = None, disable: Iterable[str] = ()) -> dict:
  """Runs `program` (a solution and its test asserts) in the sandbox; never raises for the
  program's behaviour.

  Returns {"passed", "status" (one of STATUSES), "reason", "returncode" (negative: killed by that
  signal; None: unknown), "stdout", "stderr" (head and tail, `limits.capture_bytes` each),
  "elapsed_s", "containment" (the facilities in force for this run), "workdir" (already removed)}.
  `disable` switches facilities of FACILITIES off, to test the fallbacks.
  """
  import tempfile  # pylint: disable=import-outside-toplevel (see the module docstring)
  if timeout_s <= 0:
    raise ValueError(f"check_program(timeout_s={timeout_s}); expected > 0")
  limits = (limits or Limits()).validated()
  disable = sorted(set(disable))
  unknown = [name for name in disable if name not in FACILITIES]
  if unknown:
    raise ValueError(f"check_program(disable={disable}): unknown {unknown}; "
                     f"expected names from {FACILITIES}")
  started = time.monotonic()
  workdir = tempfile.mkdtemp(prefix="maxnucl-sandbox-")
  try:
    with open(os.path.join(workdir, PROGRAM_NAME), "w", encoding="utf-8") as f:
      f.write(program)
    nonce = os.urandom(16).hex()
    config = {"workdir": workdir, "nonce": nonce, "timeout_s": timeout_s, "disable": disable,
              "limits": limits._asdict(), "parent_pid": os.getpid()}
    run = _supervise(_start_launcher(config), timeout_s, limits)
  finally:
    _remove_tree(workdir)
  result = _classify(run, nonce, timeout_s, limits)
  result.update(stdout=run.stdout.text(), stderr=run.stderr.text(), workdir=workdir,
                elapsed_s=time.monotonic() - started)
  return result


def check_programs(programs: list[str], timeout_s: float = DEFAULT_TIMEOUT_S,
                   workers: int | None = None, **kwargs) -> list[dict]:
  """`check_program` of each program, `workers` at a time (default: os.cpu_count()), in the
  order given.  Each run is a few processes that mostly wait, so threads suffice here."""
  import concurrent.futures  # pylint: disable=import-outside-toplevel
  workers = workers or os.cpu_count() or 1
  if workers < 1:
    raise ValueError(f"check_programs(workers={workers}); expected >= 1")
  run = functools.partial(check_program, timeout_s=timeout_s, **kwargs)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(run, programs))


def containment_available() -> dict:
  """What this machine's kernel offers, probed once in a throw-away process independently of any
  run: {"user_namespace", "pid_namespace", "mount_namespace", "network_namespace",
  "ipc_namespace", "landlock", "landlock_abi", "seccomp", "kernel", "unavailable" (reasons)}."""
  return _literal(_probe_in_subprocess())


@functools.lru_cache(maxsize=None)
def _probe_in_subprocess() -> str:
  import subprocess  # pylint: disable=import-outside-toplevel
  probe = subprocess.run(_interpreter_command("probe"), stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=60, env=_environment("/"),
                         check=False)
  if probe.returncode != 0:
    raise SandboxError(f"the containment probe exited with {probe.returncode}: {probe.stderr}")
  return probe.stdout


class _Run:
  """What the evaluator observed of one run."""

  def __init__(self, capture_bytes: int):
    self.stdout = _Capture(capture_bytes)
    self.stderr = _Capture(capture_bytes)
    self.done = bytearray()  # what arrived on the completion pipe
    self.reports: list[dict] = []  # the launcher's report lines
    self.started = False  # the program's code was about to run
    self.stopped_for: str | None = None  # "timeout" / "output_limit" / "startup": we killed it
    self.launcher_returncode: int | None = None


class _Capture:
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


def _interpreter_command(mode: str, *args: str) -> list[str]:
  """`python -I -S -c <bootstrap> <this file> <mode> ...`: a fresh isolated interpreter that
  loads this module by path (through its bytecode cache), without importing the maxnucl package
  nor processing site-packages' .pth files (the program gets site-packages on sys.path later)."""
  bootstrap = ("import importlib.machinery, sys, types; "
               "loader = importlib.machinery.SourceFileLoader('maxnucl_sandbox', sys.argv[1]); "
               "module = sys.modules[loader.name] = types.ModuleType(loader.name); "
               "module.__file__ = loader.path; loader.exec_module(module); "
               "module._main(sys.argv[2:])")
  return [sys.executable, "-I", "-S", "-c", bootstrap, os.path.abspath(__file__), mode, *args]


def _environment(workdir: str) -> dict:
  return {"PATH": ENVIRONMENT_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}


def _start_launcher(config: dict):
  """Starts the launcher in a new session; hands it the config (and so the nonce) through a
  pipe.  Returns (process, done read fd, report read fd)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  config_r, config_w = os.pipe()
  done_r, done_w = os.pipe()
  report_r, report_w = os.pipe()
  config.update(done_fd=done_w, report_fd=report_w)
  try:
    process = subprocess.Popen(
        _interpreter_command("launch", config["workdir"], str(config_r)),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        pass_fds=(config_r, done_w, report_w), start_new_session=True,
        env=_environment(config["workdir"]), cwd=config["workdir"])
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


def _supervise(launched, timeout_s: float, limits: Limits) -> _Run:
  """Reads stdout, stderr, the completion pipe and the launcher's reports until all are closed,
  stopping the run at the wall-clock timeout or when an output stream passes its cap."""
  import selectors  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  process, done_r, report_r = launched
  run = _Run(limits.capture_bytes)
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
        chunk = os.read(key.fd, _CHUNK)
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


def _parse_reports(buffer: bytearray, run: _Run) -> bool:
  """Moves the complete lines of `buffer` into run.reports; True once the program started."""
  *lines, rest = bytes(buffer).split(b"\n")
  buffer[:] = rest
  for line in lines:
    report = _literal(line.decode())
    run.reports.append(report)
    run.started = run.started or report.get("started", False)
  return run.started


def _literal(text: str):
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


def _remove_tree(path: str):
  """Removes the work directory even where the program took the write bit off its folders."""
  import shutil  # pylint: disable=import-outside-toplevel
  def make_writable_and_retry(function, failed_path, _):
    os.chmod(os.path.dirname(failed_path), 0o700)
    function(failed_path)
  shutil.rmtree(path, onerror=make_writable_and_retry)


def _classify(run: _Run, nonce: str, timeout_s: float, limits: Limits) -> dict:
  """The result's passed/status/reason/returncode/containment from what was observed."""
  containment, unavailable, exit_status = {}, {}, None
  for report in run.reports:
    containment.update(report.get("containment", {}))
    unavailable.update(report.get("unavailable", {}))
    exit_status = report.get("exit", exit_status)
  containment["unavailable"] = unavailable
  returncode = None
  if exit_status is not None:
    returncode = -exit_status["signal"] if exit_status["signal"] else exit_status["code"]
  completed = bytes(run.done) == nonce.encode()

  def result(status, reason):
    return {"passed": status == "passed", "status": status, "reason": reason,
            "returncode": returncode, "containment": containment}

  if not run.started:
    if run.stopped_for is not None:
      return result("sandbox_error", f"the sandbox did not start within "
                                     f"{limits.startup_timeout_s} s")
    return result("sandbox_error", f"the launcher exited with {run.launcher_returncode} before "
                                   f"the program started: {_last_line(run.stderr)}")
  if run.stopped_for == "output_limit":
    return result("output_limit", f"stdout or stderr passed {limits.output_bytes} bytes")
  if run.stopped_for == "timeout":
    return result("timeout", f"still running after the {timeout_s} s wall-clock timeout")
  if exit_status is None:
    return result("killed", f"the sandbox's init died (launcher exit {run.launcher_returncode})")
  if exit_status["signal"] == signal.SIGXCPU:
    return result("timeout", "CPU time limit (RLIMIT_CPU) reached")
  if exit_status["signal"]:
    return result("killed", f"killed by {_signal_name(exit_status['signal'])}")
  if completed and returncode == 0:
    return result("passed", "the program ran to its end")
  if completed:
    return result("failed", f"ran to its end but exited with {returncode} (atexit or a thread)")
  if returncode == 0:
    return result("early_exit", "exited with 0 before its code ran to the end")
  if _last_line(run.stderr).startswith("MemoryError"):
    return result("memory", f"MemoryError (RLIMIT_AS = {limits.memory_bytes} bytes)")
  return result("failed", f"exited with {returncode}")


def _signal_name(number: int) -> str:
  try:
    return signal.Signals(number).name
  except ValueError:
    return f"signal {number}"


def _last_line(capture: _Capture) -> str:
  lines = capture.text().strip().splitlines()
  return lines[-1] if lines else ""


# ---- kernel interfaces (ctypes) --------------------------------------------------------------

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWCGROUP = 0x02000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 1 << 14, 1 << 18
MOUNT_ATTR_RDONLY, AT_RECURSIVE, AT_FDCWD = 0x1, 0x8000, -100
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
PR_SET_CHILD_SUBREAPER, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 36, 47, 4
# Syscalls added after 5.1 have one number on every architecture.
SYS_MOUNT_SETATTR, SYS_LANDLOCK_CREATE_RULESET = 442, 444
SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 445, 446
LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1

# Landlock file-system rights and the ABI that introduced each.
LANDLOCK_FS = {"execute": (1 << 0, 1), "write_file": (1 << 1, 1), "read_file": (1 << 2, 1),
               "read_dir": (1 << 3, 1), "remove_dir": (1 << 4, 1), "remove_file": (1 << 5, 1),
               "make_char": (1 << 6, 1), "make_dir": (1 << 7, 1), "make_reg": (1 << 8, 1),
               "make_sock": (1 << 9, 1), "make_fifo": (1 << 10, 1), "make_block": (1 << 11, 1),
               "make_sym": (1 << 12, 1), "refer": (1 << 13, 2), "truncate": (1 << 14, 3),
               "ioctl_dev": (1 << 15, 5)}
LANDLOCK_NET_BIND_TCP, LANDLOCK_NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET, LANDLOCK_SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

# seccomp: kernel surface an MBPP solution never needs, denied with EPERM.
SECCOMP_DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "unshare", "setns",
    "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount", "fspick",
    "move_mount", "open_tree", "mount_setattr", "open_by_handle_at", "name_to_handle_at",
    "swapon", "swapoff", "reboot", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "bpf", "perf_event_open", "userfaultfd", "keyctl",
    "add_key", "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register", "acct",
    "quotactl", "syslog", "vhangup", "iopl", "ioperm", "personality", "lookup_dcookie",
    # the real uid that makes RLIMIT_NPROC count (see _enter_user_namespace) stays
    "setuid", "setreuid", "setresuid", "setfsuid", "setgid", "setregid", "setresgid", "setfsgid",
    "setgroups")
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ, SCMP_CMP_GT, SCMP_CMP_MASKED_EQ = 4, 6, 7
AF_INET, AF_INET6 = 2, 10


def _scmp_act_errno(number: int) -> int:
  return 0x00050000 | (number & 0xFFFF)


class _LandlockRulesetAttr(ctypes.Structure):
  _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
              ("scoped", ctypes.c_uint64)]


class _LandlockPathBeneathAttr(ctypes.Structure):
  _pack_ = 1
  _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _MountAttr(ctypes.Structure):
  _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
              ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
  _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
  _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
              ("inheritable", ctypes.c_uint32)]


class _ScmpArgCmp(ctypes.Structure):
  _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
              ("datum_b", ctypes.c_uint64)]


@functools.lru_cache(maxsize=None)
def _libc():
  libc = ctypes.CDLL(None, use_errno=True)
  libc.syscall.restype = ctypes.c_long
  return libc


def _check(result: int, what: str) -> int:
  """Raises OSError naming `what` when a libc call returned -1."""
  if result == -1:
    number = ctypes.get_errno()
    raise OSError(number, f"{what}: {os.strerror(number)}")
  return result


def _unshare(flags: int, what: str):
  _check(_libc().unshare(ctypes.c_int(flags)), f"unshare({what})")


def _prctl(option: int, arg: int, what: str):
  _check(_libc().prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({what})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None):
  def encode(text):
    return None if text is None else text.encode()
  _check(_libc().mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags),
                       encode(data)), f"mount({fstype or source} on {target})")


def _landlock_abi() -> int:
  """The kernel's Landlock ABI version; 0 where Landlock is absent or disabled."""
  version = _libc().syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                            ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
  return max(int(version), 0)


@functools.lru_cache(maxsize=None)
def _libseccomp():
  """libseccomp.so.2 with the prototypes used here; None where it is not installed."""
  try:
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
  except OSError:
    return None
  lib.seccomp_init.restype = ctypes.c_void_p
  lib.seccomp_init.argtypes = [ctypes.c_uint32]
  lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
  lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                         ctypes.c_uint, ctypes.POINTER(_ScmpArgCmp)]
  lib.seccomp_load.argtypes = [ctypes.c_void_p]
  lib.seccomp_release.argtypes = [ctypes.c_void_p]
  return lib


def _seccomp_supported() -> bool:
  with open("/proc/self/status", encoding="ascii") as f:
    return "Seccomp_filters:" in f.read() and _libseccomp() is not None


# ---- containment steps (run in the launcher's processes) --------------------------------------


def _enter_user_namespace() -> bool:
  """A new user namespace whose uid/gid 0 is the caller's uid/gid outside, so that the
  namespaces below need no privilege.

  The kernel never enforces RLIMIT_NPROC on processes whose real uid is the host's root, inside
  a user namespace or not.  So when the caller is root, PROGRAM_UID is mapped too (to the same
  uid outside), and the program's process takes it as its real uid only (files are still
  accessed as 0: the interpreter may live under /root).  Only a process in the parent namespace
  may write such a map: a forked helper does.  Where that is refused (e.g. 65534 is not mapped
  in a container's own user namespace), only our own ids are mapped.  Returns whether
  PROGRAM_UID is mapped."""
  uid, gid = os.getuid(), os.getgid()
  if uid != 0:
    _unshare(CLONE_NEWUSER, "CLONE_NEWUSER")
    _map_own_ids(uid, gid)
    return False
  unshared_r, unshared_w = os.pipe()
  helper = os.fork()
  if helper == 0:
    os.close(unshared_w)
    code = 1
    if os.read(unshared_r, 1):
      code = _write_id_maps(os.getppid(), f"0 0 1\n{PROGRAM_UID} {PROGRAM_UID} 1\n")
    os._exit(code)
  os.close(unshared_r)
  try:
    _unshare(CLONE_NEWUSER, "CLONE_NEWUSER")
    os.write(unshared_w, b"x")
  finally:
    os.close(unshared_w)
    _, status = os.waitpid(helper, 0)
  if status != 0:
    _map_own_ids(uid, gid)
    return False
  return True


def _map_own_ids(uid: int, gid: int):
  """The maps any process may write for itself: 0 inside is its own uid/gid outside."""
  for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
    with open(f"/proc/self/{name}", "w", encoding="ascii") as f:
      f.write(text)


def _write_id_maps(pid: int, text: str) -> int:
  """The helper's job: 0 once both maps of `pid` are written, 1 if the kernel refused."""
  try:
    for name in ("uid_map", "gid_map"):
      with open(f"/proc/{pid}/{name}", "w", encoding="ascii") as f:
        f.write(text)
  except OSError:
    return 1
  return 0


def _prepare_mounts(workdir: str, fresh_proc: bool, disk_bytes: int, contained: dict,
                    unavailable: dict):
  """In a new mount namespace: nothing propagates back, /proc shows only the sandbox's PID
  namespace, every mount is read-only, and the work directory is a private tmpfs of
  `disk_bytes` (so the program cannot fill the disk, and its files vanish with the namespace)."""
  if not _attempt(lambda: _mount(None, "/", None, MS_REC | MS_PRIVATE), "mount_namespace",
                  unavailable):
    contained.update(fresh_proc=False, readonly_root=False, private_tmpfs=False)
    return
  if fresh_proc:
    contained["fresh_proc"] = _attempt(
        lambda: _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC), "fresh_proc",
        unavailable)
  else:
    contained["fresh_proc"], unavailable["fresh_proc"] = False, "no PID namespace"
  contained["readonly_root"] = _attempt(_make_mounts_readonly, "readonly_root", unavailable)
  contained["private_tmpfs"] = _attempt(
      lambda: _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
                     f"size={disk_bytes},nr_inodes=16384,mode=0700"), "private_tmpfs", unavailable)


def _make_mounts_readonly():
  attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY)
  _check(_libc().syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr),
                         ctypes.sizeof(attr)), "mount_setattr(/, MOUNT_ATTR_RDONLY, recursive)")


def _attempt_unless_disabled(step, name: str, disabled: set, unavailable: dict) -> bool:
  if name in disabled:
    unavailable[name] = "disabled by the caller"
    return False
  return _attempt(step, name, unavailable)


def _attempt(step, name: str, unavailable: dict) -> bool:
  """Runs one containment step; a refusal is recorded (not raised): the run goes on without it."""
  try:
    step()
    return True
  except OSError as error:
    unavailable[name] = str(error)
    return False


def _apply_rlimits(limits: dict, timeout_s: float) -> dict:
  """Sets the per-process limits (never above an existing hard limit); returns them by name."""
  cpu_s = math.ceil(timeout_s) + 1
  wanted = {"RLIMIT_CPU": (cpu_s, cpu_s + 1), "RLIMIT_AS": limits["memory_bytes"],
            "RLIMIT_FSIZE": limits["file_bytes"], "RLIMIT_NOFILE": limits["open_files"],
            "RLIMIT_NPROC": limits["processes"], "RLIMIT_CORE": 0}
  applied = {}
  for name, value in wanted.items():
    soft, hard = value if isinstance(value, tuple) else (value, value)
    kind = getattr(resource, name)
    _, current_hard = resource.getrlimit(kind)
    if current_hard != resource.RLIM_INFINITY:
      soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(kind, (soft, hard))
    applied[name] = soft
  return applied


def _drop_capabilities():
  """No capability left, not even after an exec as uid 0 (the bounding set is emptied too)."""
  with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
    last = int(f.read())
  for capability in range(last + 1):
    _prctl(PR_CAPBSET_DROP, capability, f"PR_CAPBSET_DROP {capability}")
  _check(_libc().prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "PR_CAP_AMBIENT")
  data = (_CapData * 2)()
  _check(_libc().capset(ctypes.byref(_CapHeader(0x20080522, 0)), data), "capset(0)")


def _apply_landlock(workdir: str, abi: int):
  """Read and execute everywhere; create, write, rename and remove only beneath `workdir` (and
  write /dev/null); with ABI >= 4 no TCP bind/connect; with ABI >= 6 signals and abstract unix
  sockets only within the sandbox."""
  if abi < 1:
    raise OSError(errno.ENOSYS, "Landlock is not available in this kernel")
  handled = 0
  for right, since in LANDLOCK_FS.values():
    handled |= right if abi >= since else 0

  def rights(*names):  # those of `names` this ABI knows
    return functools.reduce(lambda a, b: a | b, (LANDLOCK_FS[n][0] for n in names)) & handled
  attr = _LandlockRulesetAttr(
      handled_access_fs=handled,
      handled_access_net=(LANDLOCK_NET_BIND_TCP | LANDLOCK_NET_CONNECT_TCP) if abi >= 4 else 0,
      scoped=(LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL) if abi >= 6 else 0)
  ruleset = _check(_libc().syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr),
                                   ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0)),
                   "landlock_create_ruleset")
  try:
    for path, allowed in (("/", rights("execute", "read_file", "read_dir")),
                          (workdir, handled),
                          ("/dev/null", rights("read_file", "write_file", "truncate"))):
      _landlock_allow(ruleset, path, allowed)
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
    _check(_libc().syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
  finally:
    os.close(ruleset)


def _landlock_allow(ruleset: int, path: str, allowed: int):
  fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
  try:
    rule = _LandlockPathBeneathAttr(allowed_access=allowed, parent_fd=fd)
    _check(_libc().syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH,
                           ctypes.byref(rule), 0), f"landlock_add_rule({path})")
  finally:
    os.close(fd)


def _apply_seccomp():
  """Allows every syscall but SECCOMP_DENIED (EPERM), namespace flags on clone (EPERM), clone3
  (ENOSYS, so libc falls back to clone, whose flags a filter can see) and socket() for any
  family but AF_INET/AF_INET6 (EACCES).  Other architectures' syscalls kill (libseccomp's
  default), so the filter cannot be bypassed through the 32-bit ABI."""
  lib = _libseccomp()
  if lib is None:
    raise OSError(errno.ENOENT, "libseccomp.so.2 is not installed")
  ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
  if not ctx:
    raise OSError(errno.ENOMEM, "seccomp_init failed")
  try:
    def deny(name, action, *comparisons):
      number = lib.seccomp_syscall_resolve_name(name.encode())
      if number < 0:
        return  # not a syscall on this architecture
      array = (_ScmpArgCmp * max(len(comparisons), 1))(*comparisons)
      result = lib.seccomp_rule_add_array(ctx, action, number, len(comparisons), array)
      if result < 0:
        raise OSError(-result, f"seccomp_rule_add({name}): {os.strerror(-result)}")
    for name in SECCOMP_DENIED:
      deny(name, _scmp_act_errno(errno.EPERM))
    deny("clone3", _scmp_act_errno(errno.ENOSYS))
    for flag in (CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID,
                 CLONE_NEWNET, CLONE_NEWCGROUP):
      deny("clone", _scmp_act_errno(errno.EPERM), _ScmpArgCmp(0, SCMP_CMP_MASKED_EQ, flag, flag))
    # socket(family): allowed for 2 and 10 only; a value above 10 includes every value with
    # high bits set, which the kernel would truncate to an int.
    for family in (0, 1, 3, 4, 5, 6, 7, 8, 9):
      deny("socket", _scmp_act_errno(errno.EACCES), _ScmpArgCmp(0, SCMP_CMP_EQ, family, 0))
    deny("socket", _scmp_act_errno(errno.EACCES), _ScmpArgCmp(0, SCMP_CMP_GT, AF_INET6, 0))
    result = lib.seccomp_load(ctx)
    if result < 0:
      raise OSError(-result, f"seccomp_load: {os.strerror(-result)}")
  finally:
    lib.seccomp_release(ctx)


def _descendants(root: int) -> list[int]:
  """Every live (non-zombie) process below `root`, from /proc."""
  children: dict[int, list[int]] = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
        fields = f.read().rpartition(")")[2].split()
    except OSError:
      continue
    if fields and fields[0] != "Z":
      children.setdefault(int(fields[1]), []).append(int(entry))
  found, frontier = [], [root]
  while frontier:
    frontier = [child for pid in frontier for child in children.get(pid, ())]
    found += frontier
  return found


def _kill_descendants():
  """SIGKILL to every descendant until none is left; orphans come back to this process (a child
  subreaper), so a process cannot slip out of the tree by reparenting."""
  for _ in range(1000):
    pids = _descendants(os.getpid())
    if not pids:
      break
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    _reap_children(block=False)
  _reap_children(block=True)


def _reap_children(block: bool):
  while True:
    try:
      pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
    except ChildProcessError:
      return
    if pid == 0:
      return


class _Reporter:
  """Python literals, one a line, to the evaluator on the report pipe (the program never holds
  it).  Not JSON: json imports re, and every program would pay for it at start-up."""

  def __init__(self, fd: int):
    self.fd = fd

  def send(self, **message):
    os.write(self.fd, repr(message).encode() + b"\n")

  def close(self):
    os.close(self.fd)


# ---- the launcher's three processes -----------------------------------------------------------


def _main(argv: list[str]):
  """Entry point of `python -I -S -c <bootstrap>` (see _interpreter_command)."""
  mode, *args = argv
  if mode == "launch":
    _launcher(int(args[1]))
  elif mode == "probe":
    print(repr(_probe()))
  else:
    raise SystemExit(f"maxnucl sandbox: unknown mode {mode!r}; expected 'launch' or 'probe'")


def _launcher(config_fd: int):
  """The launcher (host PID namespace): user and PID namespaces, then init; at the end, or on
  SIGTERM from the evaluator, nothing the program started may remain."""
  config = marshal.loads(_read_all(config_fd))
  report = _Reporter(config["report_fd"])
  disabled = set(config["disable"])
  contained, unavailable = {"process_group": True}, {}
  _prctl(PR_SET_CHILD_SUBREAPER, 1, "PR_SET_CHILD_SUBREAPER")
  config.update(host_uid=os.getuid(), program_uid=None)

  def enter_user_namespace():
    if _enter_user_namespace():
      config["program_uid"] = PROGRAM_UID
  contained["user_namespace"] = _attempt_unless_disabled(enter_user_namespace, "user_namespace",
                                                         disabled, unavailable)
  contained["pid_namespace"] = _attempt_unless_disabled(
      lambda: _unshare(CLONE_NEWPID, "CLONE_NEWPID"), "pid_namespace", disabled, unavailable)
  _prctl(PR_SET_PDEATHSIG, signal.SIGTERM, "PR_SET_PDEATHSIG")  # the evaluator died: clean up
  if os.getppid() != config["parent_pid"]:
    raise SystemExit("maxnucl sandbox: the evaluator exited before the launcher started")
  with open(os.path.join(config["workdir"], PROGRAM_NAME), encoding="utf-8") as f:
    source = f.read()
  report.send(containment=contained, unavailable=unavailable)

  init_pid = []
  def stop(*_):
    if init_pid and contained["pid_namespace"]:
      os.kill(init_pid[0], signal.SIGKILL)  # the kernel kills the namespace with its init
    _kill_descendants()
    os._exit(128 + signal.SIGTERM)
  signal.signal(signal.SIGTERM, stop)
  pid = os.fork()
  if pid == 0:
    _init(config, source, report, contained["pid_namespace"])  # never returns
  init_pid.append(pid)
  _, status = os.waitpid(pid, 0)
  if not contained["pid_namespace"]:
    _kill_descendants()
  os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _init(config: dict, source: str, report: _Reporter, pid_namespace: bool):
  """PID 1 of the sandbox (or a plain child without a PID namespace): the remaining namespaces
  and the mounts, then the program as its child; reports the program's exit status."""
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "PR_SET_PDEATHSIG")  # the launcher died: end it all
  disabled = set(config["disable"])
  contained, unavailable = {}, {}
  for name, flag in (("mount_namespace", CLONE_NEWNS), ("network_namespace", CLONE_NEWNET),
                     ("ipc_namespace", CLONE_NEWIPC | CLONE_NEWUTS)):  # IPC and host name
    contained[name] = _attempt_unless_disabled(functools.partial(_unshare, flag, name), name,
                                               disabled, unavailable)
  if contained["mount_namespace"]:
    _prepare_mounts(config["workdir"], pid_namespace, config["limits"]["disk_bytes"], contained,
                    unavailable)
  report.send(containment=contained, unavailable=unavailable)

  program_pid = os.fork()
  if program_pid == 0:
    _program(config, source, report)  # never returns
  exit_status = None
  while exit_status is None:  # as init, reap every orphan until the program itself ends
    pid, status = os.waitpid(-1, 0)
    if pid == program_pid:
      exit_status = status
  report.send(exit={"code": os.WEXITSTATUS(exit_status) if os.WIFEXITED(exit_status) else None,
                    "signal": os.WTERMSIG(exit_status) if os.WIFSIGNALED(exit_status) else 0})
  os._exit(0)


def _program(config: dict, source: str, report: _Reporter):
  """The program's process: the remaining containment, then its code; ends the process."""
  workdir = config["workdir"]
  disabled = set(config["disable"])
  os.chdir(workdir)  # into the tmpfs, which was mounted over the directory after our cwd was set
  path = os.path.join(workdir, PROGRAM_NAME)
  with open(path, "w", encoding="utf-8") as f:
    f.write(source)
  contained, unavailable = {}, {}
  program_uid = config["program_uid"]
  contained["program_uid"] = program_uid is not None and _attempt(
      lambda: os.setresuid(program_uid, 0, 0), "program_uid", unavailable)
  contained["capabilities_dropped"] = _attempt(_drop_capabilities, "capabilities_dropped",
                                               unavailable)
  contained["no_new_privs"] = _attempt(
      lambda: _prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS"), "no_new_privs", unavailable)
  abi = _landlock_abi()
  contained.update(landlock_abi=abi, landlock_network=False, landlock_scopes=False)
  contained["landlock"] = _attempt_unless_disabled(lambda: _apply_landlock(workdir, abi),
                                                   "landlock", disabled, unavailable)
  if contained["landlock"]:
    contained.update(landlock_network=abi >= 4, landlock_scopes=abi >= 6)
  contained["seccomp"] = _attempt_unless_disabled(_apply_seccomp, "seccomp", disabled,
                                                  unavailable)
  contained["rlimits"] = _apply_rlimits(config["limits"], config["timeout_s"])
  # Root's tasks are exempt from RLIMIT_NPROC; PROGRAM_UID's real uid holds only while seccomp
  # denies the set*id calls that could take 0 back.
  contained["nproc_enforced"] = config["host_uid"] != 0 or (
      contained["program_uid"] and contained["seccomp"])
  report.send(containment=contained, unavailable=unavailable, started=True)
  report.close()
  os.set_inheritable(config["done_fd"], False)  # not into what the program executes
  _run_to_completion(path, source, config["done_fd"], config["nonce"].encode())


def _run_to_completion(path: str, source: str, done_fd: int, nonce: bytes):
  """Executes the program as `__main__`; only if its code object returns normally is the nonce
  written.  Exceptions are shown from the program's own frames on, as `python program.py` would."""
  write = os.write  # bound before the program could replace it
  main = types.ModuleType("__main__")
  main.__file__, main.__builtins__ = path, builtins
  sys.modules["__main__"] = main
  import site  # pylint: disable=import-outside-toplevel (-S: imported, not run)
  site.setquit()  # exit() and quit(), as `python program.py` has them
  site.sethelper()
  sys.argv = [path]
  sys.path[0:0] = [os.path.dirname(path)]
  sys.path += [p for p in site.getsitepackages() if os.path.isdir(p) and p not in sys.path]
  try:
    exec(compile(source, path, "exec"), main.__dict__)  # pylint: disable=exec-used
  except SystemExit:
    raise
  except BaseException as error:  # pylint: disable=broad-except
    error = error.with_traceback(error.__traceback__.tb_next)
    sys.excepthook(type(error), error, error.__traceback__)
    raise SystemExit(1) from None
  write(done_fd, nonce)
  raise SystemExit(0)


def _read_all(fd: int) -> bytes:
  chunks = []
  while chunk := os.read(fd, _CHUNK):
    chunks.append(chunk)
  os.close(fd)
  return b"".join(chunks)


def _probe() -> dict:
  """containment_available(), measured in this throw-away process: each namespace is unshared
  once (inside the new user namespace where one can be had, as the launcher does)."""
  available, unavailable = {}, {}
  available["user_namespace"] = _attempt(_enter_user_namespace, "user_namespace", unavailable)
  for name, flag in (("pid_namespace", CLONE_NEWPID), ("mount_namespace", CLONE_NEWNS),
                     ("network_namespace", CLONE_NEWNET),
                     ("ipc_namespace", CLONE_NEWIPC | CLONE_NEWUTS)):
    available[name] = _attempt(functools.partial(_unshare, flag, name), name, unavailable)
  abi = _landlock_abi()
  available.update(landlock=abi > 0, landlock_abi=abi, seccomp=_seccomp_supported(),
                   kernel=os.uname().release, unavailable=unavailable)
  return available
