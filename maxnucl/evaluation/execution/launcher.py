"""The sandbox's three processes: the launcher (`python -I -S`, started by the supervisor), the
init of the new PID namespace, and the program's process, which runs the program's code.

This file is loaded by path, with its package's other modules but not the maxnucl package, in a
fresh `python -I -S` interpreter for every program (`supervisor.interpreter_command`); every
module it imports adds to every program's start-up, so it imports only the standard library
modules it needs and this package's `limits`, `kernel` and `containment`."""

from __future__ import annotations

import builtins
import functools
import marshal
import os
import signal
import sys
import types

from .containment import (PROGRAM_UID, apply_landlock, apply_rlimits, apply_seccomp, attempt,
                          attempt_unless_disabled, drop_capabilities, enter_user_namespace,
                          prepare_mounts)
from .kernel import (CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUTS,
                     PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, landlock_abi,
                     prctl, read_into_c_memory, seccomp_supported, unshare, write_from_c_memory)
from .limits import PROGRAM_NAME, TOKEN_BYTES


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


def main(argv: list[str]):
  """Entry point of `python -I -S -c <bootstrap>` (see supervisor.interpreter_command)."""
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
  prctl(PR_SET_CHILD_SUBREAPER, 1, "PR_SET_CHILD_SUBREAPER")
  config.update(host_uid=os.getuid(), program_uid=None)

  def enter_user_namespace_mapping_the_program_uid():
    if enter_user_namespace():
      config["program_uid"] = PROGRAM_UID
  contained["user_namespace"] = attempt_unless_disabled(
      enter_user_namespace_mapping_the_program_uid, "user_namespace", disabled, unavailable)
  contained["pid_namespace"] = attempt_unless_disabled(
      lambda: unshare(CLONE_NEWPID, "CLONE_NEWPID"), "pid_namespace", disabled, unavailable)
  prctl(PR_SET_PDEATHSIG, signal.SIGTERM, "PR_SET_PDEATHSIG")  # the evaluator died: clean up
  if os.getppid() != config["parent_pid"]:
    raise SystemExit("maxnucl sandbox: the evaluator exited before the launcher started")
  with open(os.path.join(config["workdir"], PROGRAM_NAME), encoding="utf-8",
            errors="surrogatepass") as f:
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
  os.close(config["token_fd"])  # only the program's process reads it
  _, status = os.waitpid(pid, 0)
  if not contained["pid_namespace"]:
    _kill_descendants()
  os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _init(config: dict, source: str, report: _Reporter, pid_namespace: bool):
  """PID 1 of the sandbox (or a plain child without a PID namespace): the remaining namespaces
  and the mounts, then the program as its child; reports the program's exit status."""
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "PR_SET_PDEATHSIG")  # the launcher died: end it all
  disabled = set(config["disable"])
  contained, unavailable = {}, {}
  for name, flag in (("mount_namespace", CLONE_NEWNS), ("network_namespace", CLONE_NEWNET),
                     ("ipc_namespace", CLONE_NEWIPC | CLONE_NEWUTS)):  # IPC and host name
    contained[name] = attempt_unless_disabled(functools.partial(unshare, flag, name), name,
                                              disabled, unavailable)
  if contained["mount_namespace"]:
    prepare_mounts(config["workdir"], pid_namespace, config["limits"], contained, unavailable)
  else:
    contained["private_shm"], unavailable["private_shm"] = False, "no mount namespace"
  config["private_shm"] = contained["private_shm"]
  report.send(containment=contained, unavailable=unavailable)

  program_pid = os.fork()
  if program_pid == 0:
    _program(config, source, report)  # never returns
  os.close(config["token_fd"])
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
  with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
    f.write(source)
  contained, unavailable = {}, {}
  program_uid = config["program_uid"]
  contained["program_uid"] = program_uid is not None and attempt(
      lambda: os.setresuid(program_uid, 0, 0), "program_uid", unavailable)
  contained["capabilities_dropped"] = attempt(drop_capabilities, "capabilities_dropped",
                                              unavailable)
  contained["no_new_privs"] = attempt(
      lambda: prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS"), "no_new_privs", unavailable)
  abi = landlock_abi()
  contained.update(landlock_abi=abi, landlock_network=False, landlock_scopes=False)
  contained["landlock"] = attempt_unless_disabled(
      lambda: apply_landlock(workdir, abi, writable_shm=config["private_shm"]), "landlock",
      disabled, unavailable)
  if contained["landlock"]:
    contained.update(landlock_network=abi >= 4, landlock_scopes=abi >= 6)
  contained["seccomp"] = attempt_unless_disabled(apply_seccomp, "seccomp", disabled,
                                                 unavailable)
  contained["rlimits"] = apply_rlimits(config["limits"], config["timeout_s"])
  # Root's tasks are exempt from RLIMIT_NPROC; PROGRAM_UID's real uid holds only while seccomp
  # denies the set*id calls that could take 0 back.
  contained["nproc_enforced"] = config["host_uid"] != 0 or (
      contained["program_uid"] and contained["seccomp"])
  report.send(containment=contained, unavailable=unavailable, started=True)
  report.close()
  os.set_inheritable(config["done_fd"], False)  # not into what the program executes
  _run_to_completion(path, source, config["done_fd"], config["token_fd"])


def _run_to_completion(path: str, source: str, done_fd: int, token_fd: int):
  """Executes the program as `__main__`; only if its code object returns normally is the
  completion token written to `done_fd`.  Exceptions are shown from the program's own frames on,
  as `python program.py` would.

  The token never exists as a Python object in this interpreter: it is read from `token_fd`
  (which is then closed) into memory that libc allocated, and written from there, so neither the
  frames above the program's code nor gc's objects hold it.  What a program can still reach is
  the residual risk in docs/evaluation.md (reading its own memory through ctypes or
  /proc/self/mem, or calling this module's code)."""
  token = read_into_c_memory(token_fd, TOKEN_BYTES)
  os.close(token_fd)
  write_token = functools.partial(write_from_c_memory, done_fd, token, TOKEN_BYTES)
  module = types.ModuleType("__main__")
  module.__file__, module.__builtins__ = path, builtins
  sys.modules["__main__"] = module
  import site  # pylint: disable=import-outside-toplevel (-S: imported, not run)
  site.setquit()  # exit() and quit(), as `python program.py` has them
  site.sethelper()
  sys.argv = [path]
  sys.path[0:0] = [os.path.dirname(path)]
  sys.path += [p for p in site.getsitepackages() if os.path.isdir(p) and p not in sys.path]
  try:
    exec(compile(source, path, "exec"), module.__dict__)  # pylint: disable=exec-used
  except SystemExit:
    raise
  except BaseException as error:  # pylint: disable=broad-except
    error = error.with_traceback(error.__traceback__.tb_next)
    sys.excepthook(type(error), error, error.__traceback__)
    raise SystemExit(1) from None
  write_token()
  raise SystemExit(0)


def _read_all(fd: int) -> bytes:
  chunks = []
  while chunk := os.read(fd, 1 << 16):
    chunks.append(chunk)
  os.close(fd)
  return b"".join(chunks)


def _probe() -> dict:
  """containment_available(), measured in this throw-away process: each namespace is unshared
  once (inside the new user namespace where one can be had, as the launcher does)."""
  available, unavailable = {}, {}
  available["user_namespace"] = attempt(enter_user_namespace, "user_namespace", unavailable)
  for name, flag in (("pid_namespace", CLONE_NEWPID), ("mount_namespace", CLONE_NEWNS),
                     ("network_namespace", CLONE_NEWNET),
                     ("ipc_namespace", CLONE_NEWIPC | CLONE_NEWUTS)):
    available[name] = attempt(functools.partial(unshare, flag, name), name, unavailable)
  abi = landlock_abi()
  available.update(landlock=abi > 0, landlock_abi=abi, seccomp=seccomp_supported(),
                   kernel=os.uname().release, unavailable=unavailable)
  return available
