"""Sandboxed execution of untrusted, model-written Python programs (MBPP, HumanEval).

`check_program(program)` runs one program -- a model's solution followed by the benchmark's test
asserts -- and says whether its tests ran to their end; `check_programs` runs many in parallel.
The programs are untrusted: a model may write an infinite loop, a fork bomb, `shutil.rmtree`, a
socket, gigabytes of output or a detached daemon, by accident or because it learnt that exiting
early "passes".  Each run is contained with the kernel's unprivileged facilities and every
facility actually in force is reported in `result["containment"]`.

Process tree of one run

    evaluator (this process): writes the program into a fresh temporary directory, reads the
     |  pipes with caps, enforces the wall-clock timeout, classifies the outcome, removes the dir
     |  (and, once per process, the directories of evaluators that were killed mid-run)
     +- launcher  `python -I -S -c <bootstrap>`, a new session: unshares a user namespace (uid 0
         |        in it is the caller's uid outside) and a PID namespace; kills what is left at the
         |        end, also when the evaluator dies (parent-death signal)
         +- init  PID 1 of the new PID namespace: new mount, network, IPC and UTS namespaces; a
             |    fresh /proc, every mount read-only, size-capped tmpfs on the work directory
             |    and on /dev/shm;
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
    the disk cannot be filled either, and a private tmpfs of `Limits.shm_bytes` on /dev/shm
    (multiprocessing's semaphores; Landlock lets the program write it only when it is private).
  * network: an empty network namespace (not even loopback is up); Landlock (ABI >= 4) denies
    every TCP bind and connect; seccomp allows socket() only for AF_INET/AF_INET6, because a
    pathname AF_UNIX socket (e.g. a container runtime's) is reached through the file system and
    Landlock does not cover connecting to one.
  * processes: the PID namespace hides and protects every process outside it; Landlock (ABI >= 6)
    scopes signals and abstract unix sockets to the sandbox; seccomp denies ptrace, new
    namespaces, mounts, io_uring, bpf, keyrings, set*id and similar kernel surface; all
    capabilities are dropped (the user namespace's included) and no_new_privs is set.
  * output: everything read from the sandbox has a cap: stdout and stderr past
    `Limits.output_bytes`, the completion pipe past 4 KiB, the launcher's reports past 1 MiB stop
    the run (output_limit), and only a bounded part of each is kept, so the evaluator's memory
    does not grow with what a program writes.  stdin is /dev/null; the environment is PATH, HOME, TMPDIR and LANG only.  The
    program sees the standard library and site-packages (but no .pth file is processed).
  * cleanup: at the end (normal, timeout, cap) the PID namespace's init exits, which kills all
    that the program started.  Where no PID namespace can be had, the launcher is a child
    subreaper and kills every descendant it finds in /proc.  The temporary directory is removed;
    its name records the evaluator's pid, so a directory that a SIGKILLed evaluator left behind
    is removed by the next evaluator using the same temporary directory.

A facility the kernel refuses is reported as inactive (with the reason under "unavailable") and the
run goes on with the others; `containment_available()` says what this machine offers.

Completion check.  A program passes only if its code object returned normally and then its
process wrote a per-run random token to the completion pipe.  The token reaches the program's
process through a pipe of its own (never the command line, the environment, the launcher or init)
and is read into memory that libc allocated, so it never exists as a Python object there: neither
the harness's frames nor gc's objects hold it.  `sys.exit(0)`, `os._exit(0)`, `raise SystemExit`
or a signal before the end of the asserts leaves it unwritten (status "early_exit" when the exit
code is 0); stray bytes the program writes to the pipe do not hide it.  Residual risk (see
docs/evaluation.md): a program written *against this harness* can still read its own memory
(ctypes, /proc/self/mem) or call the harness's code; a model's solution that merely exits early,
swallows its own exceptions or kills itself cannot.

The package, one level a file:
  __init__.py        the public API: check_program, check_programs, containment_available
  limits.py          Limits (what one run may use) and the names both sides share
  supervisor.py      the evaluator's side of a run: starts the launcher, reads its pipes with caps,
                     enforces the timeout, removes the work directory
  classification.py  the verdict (STATUSES) from what the supervisor observed
  launcher.py        the sandbox's processes: launcher, init, the program's process
  containment.py     the containment steps those processes apply (namespaces, mounts, Landlock,
                     seccomp, rlimits, capabilities)
  kernel.py          ctypes bindings for those kernel facilities
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterable

from . import classification, containment, supervisor
from .classification import STATUSES
from .containment import FACILITIES, PROGRAM_UID
from .limits import DEFAULT_TIMEOUT_S, LIMIT_DEFAULTS, PROGRAM_NAME, TOKEN_BYTES, Limits

__all__ = ["check_program", "check_programs", "containment_available", "SandboxError", "Limits",
           "LIMIT_DEFAULTS", "DEFAULT_TIMEOUT_S", "STATUSES", "FACILITIES", "PROGRAM_NAME",
           "PROGRAM_UID"]


class SandboxError(RuntimeError):
  """The sandbox itself (not the program) could not be set up."""


def check_program(program: str, timeout_s: float = DEFAULT_TIMEOUT_S, *,
                  limits: Limits | None = None, disable: Iterable[str] = ()) -> dict:
  """Runs `program` (a solution and its test asserts) in the sandbox; never raises for the
  program's text or behaviour (only for invalid arguments, or where the evaluator's own temporary
  directory cannot be written).

  Returns {"passed", "status" (one of STATUSES), "reason", "returncode" (negative: killed by that
  signal; None: unknown), "stdout", "stderr" (head and tail, `limits.capture_bytes` each),
  "elapsed_s", "containment" (the facilities in force for this run), "workdir" (already removed)}.
  `disable` switches facilities of FACILITIES off, to test the fallbacks.
  """
  if timeout_s <= 0:
    raise ValueError(f"check_program(timeout_s={timeout_s}); expected > 0")
  limits = (limits or Limits()).validated()
  disable = sorted(set(disable))
  unknown = [name for name in disable if name not in FACILITIES]
  if unknown:
    raise ValueError(f"check_program(disable={disable}): unknown {unknown}; "
                     f"expected names from {FACILITIES}")
  started = time.monotonic()
  _sweep_once()
  workdir = supervisor.make_workdir()
  try:
    # Any str is carried over losslessly, lone surrogates included ("surrogatepass"): what
    # Python does with the text (compile() refuses a surrogate) is the program's result.
    with open(os.path.join(workdir, PROGRAM_NAME), "w", encoding="utf-8",
              errors="surrogatepass") as f:
      f.write(program)
    token = os.urandom(TOKEN_BYTES // 2).hex().encode()
    config = {"workdir": workdir, "timeout_s": timeout_s, "disable": disable,
              "limits": limits._asdict(), "parent_pid": os.getpid()}
    run = supervisor.supervise(supervisor.start_launcher(config, token), token, timeout_s,
                               limits)
  finally:
    supervisor.remove_tree(workdir)
  result = classification.classify(run, timeout_s, limits)
  result.update(stdout=run.stdout.text(), stderr=run.stderr.text(), workdir=workdir,
                elapsed_s=time.monotonic() - started)
  return result


_SWEPT: set[str] = set()  # temporary directories swept by this process


def _sweep_once():
  """Removes, once per process and temporary directory, the work directories that killed
  evaluators left there (supervisor.sweep_stale_workdirs)."""
  import tempfile  # pylint: disable=import-outside-toplevel
  directory = tempfile.gettempdir()
  if directory not in _SWEPT:
    _SWEPT.add(directory)
    supervisor.sweep_stale_workdirs(directory)


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
  return supervisor.literal(_probe_in_subprocess())


@functools.lru_cache(maxsize=None)
def _probe_in_subprocess() -> str:
  import subprocess  # pylint: disable=import-outside-toplevel
  probe = subprocess.run(supervisor.interpreter_command("probe"), stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=60,
                         env=supervisor.environment("/"), check=False)
  if probe.returncode != 0:
    raise SandboxError(f"the containment probe exited with {probe.returncode}: {probe.stderr}")
  return probe.stdout
