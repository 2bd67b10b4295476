"""The containment steps the launcher's processes apply, each on its own so that a step the
kernel refuses is reported (`attempt`) and the run goes on with the others: the user namespace
and its id maps, the mounts (read-only root, private tmpfs), Landlock rules, the seccomp filter,
rlimits and capabilities."""

from __future__ import annotations

import ctypes
import errno
import functools
import math
import os
import resource

from .kernel import (AF_INET6, AT_FDCWD, AT_RECURSIVE, CLONE_NEWCGROUP, CLONE_NEWIPC,
                     CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWUSER, CLONE_NEWUTS, CapData,
                     CapHeader, LANDLOCK_FS, LANDLOCK_NET_BIND_TCP, LANDLOCK_NET_CONNECT_TCP,
                     LANDLOCK_RULE_PATH_BENEATH, LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET,
                     LANDLOCK_SCOPE_SIGNAL, LandlockPathBeneathAttr, LandlockRulesetAttr,
                     MOUNT_ATTR_RDONLY, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_REC,
                     MountAttr, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL,
                     PR_SET_NO_NEW_PRIVS, SCMP_ACT_ALLOW, SCMP_CMP_EQ, SCMP_CMP_GT,
                     SCMP_CMP_MASKED_EQ, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_CREATE_RULESET,
                     SYS_LANDLOCK_RESTRICT_SELF, SYS_MOUNT_SETATTR, ScmpArgCmp, check, libc,
                     libseccomp, mount, prctl, scmp_act_errno, unshare)


# What `check_program(disable=...)` may switch off (to exercise and test the fallbacks).
FACILITIES = ("user_namespace", "pid_namespace", "mount_namespace", "network_namespace",
              "ipc_namespace", "landlock", "seccomp")


PROGRAM_UID = 65534  # the program's real uid when the evaluator is root (enter_user_namespace)
# seccomp: kernel surface an MBPP solution never needs, denied with EPERM.
SECCOMP_DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "unshare", "setns",
    "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount", "fspick",
    "move_mount", "open_tree", "mount_setattr", "open_by_handle_at", "name_to_handle_at",
    "swapon", "swapoff", "reboot", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "bpf", "perf_event_open", "userfaultfd", "keyctl",
    "add_key", "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register", "acct",
    "quotactl", "syslog", "vhangup", "iopl", "ioperm", "personality", "lookup_dcookie",
    # the real uid that makes RLIMIT_NPROC count (see enter_user_namespace) stays
    "setuid", "setreuid", "setresuid", "setfsuid", "setgid", "setregid", "setresgid", "setfsgid",
    "setgroups")


def enter_user_namespace() -> bool:
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
    unshare(CLONE_NEWUSER, "CLONE_NEWUSER")
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
    unshare(CLONE_NEWUSER, "CLONE_NEWUSER")
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


def prepare_mounts(workdir: str, fresh_proc: bool, limits: dict, contained: dict,
                   unavailable: dict):
  """In a new mount namespace: nothing propagates back, /proc shows only the sandbox's PID
  namespace, every mount is read-only, the work directory is a private tmpfs of
  `limits["disk_bytes"]` (so the program cannot fill the disk, and its files vanish with the
  namespace) and /dev/shm a private tmpfs of `limits["shm_bytes"]` (multiprocessing's semaphores
  and shared memory live there; the host's stays read-only and unseen)."""
  if not attempt(lambda: mount(None, "/", None, MS_REC | MS_PRIVATE), "mount_namespace",
                  unavailable):
    contained.update(fresh_proc=False, readonly_root=False, private_tmpfs=False,
                     private_shm=False)
    return
  if fresh_proc:
    contained["fresh_proc"] = attempt(
        lambda: mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC), "fresh_proc",
        unavailable)
  else:
    contained["fresh_proc"], unavailable["fresh_proc"] = False, "no PID namespace"
  contained["readonly_root"] = attempt(_make_mounts_readonly, "readonly_root", unavailable)
  contained["private_tmpfs"] = attempt(
      lambda: mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
                    f"size={limits['disk_bytes']},nr_inodes=16384,mode=0700"),
      "private_tmpfs", unavailable)
  contained["private_shm"] = attempt(
      lambda: mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                    f"size={limits['shm_bytes']},nr_inodes=4096,mode=1777"),
      "private_shm", unavailable)


def _make_mounts_readonly():
  attr = MountAttr(attr_set=MOUNT_ATTR_RDONLY)
  check(libc().syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr),
                         ctypes.sizeof(attr)), "mount_setattr(/, MOUNT_ATTR_RDONLY, recursive)")


def attempt_unless_disabled(step, name: str, disabled: set, unavailable: dict) -> bool:
  if name in disabled:
    unavailable[name] = "disabled by the caller"
    return False
  return attempt(step, name, unavailable)


def attempt(step, name: str, unavailable: dict) -> bool:
  """Runs one containment step; a refusal is recorded (not raised): the run goes on without it."""
  try:
    step()
    return True
  except OSError as error:
    unavailable[name] = str(error)
    return False


def apply_rlimits(limits: dict, timeout_s: float) -> dict:
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


def drop_capabilities():
  """No capability left, not even after an exec as uid 0 (the bounding set is emptied too)."""
  with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
    last = int(f.read())
  for capability in range(last + 1):
    prctl(PR_CAPBSET_DROP, capability, f"PR_CAPBSET_DROP {capability}")
  check(libc().prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "PR_CAP_AMBIENT")
  data = (CapData * 2)()
  check(libc().capset(ctypes.byref(CapHeader(0x20080522, 0)), data), "capset(0)")


def apply_landlock(workdir: str, abi: int, writable_shm: bool):
  """Read and execute everywhere; create, write, rename and remove only beneath `workdir` (and
  /dev/shm when `writable_shm`: only where it is the sandbox's private tmpfs), and write
  /dev/null; with ABI >= 4 no TCP bind/connect; with ABI >= 6 signals and abstract unix sockets
  only within the sandbox."""
  if abi < 1:
    raise OSError(errno.ENOSYS, "Landlock is not available in this kernel")
  handled = 0
  for right, since in LANDLOCK_FS.values():
    handled |= right if abi >= since else 0

  def rights(*names):  # those of `names` this ABI knows
    return functools.reduce(lambda a, b: a | b, (LANDLOCK_FS[n][0] for n in names)) & handled
  attr = LandlockRulesetAttr(
      handled_access_fs=handled,
      handled_access_net=(LANDLOCK_NET_BIND_TCP | LANDLOCK_NET_CONNECT_TCP) if abi >= 4 else 0,
      scoped=(LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | LANDLOCK_SCOPE_SIGNAL) if abi >= 6 else 0)
  ruleset = check(libc().syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr),
                                  ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0)),
                  "landlock_create_ruleset")
  allowed_paths = [("/", rights("execute", "read_file", "read_dir")), (workdir, handled),
                   ("/dev/null", rights("read_file", "write_file", "truncate"))]
  if writable_shm:
    allowed_paths.append(("/dev/shm", handled))
  try:
    for path, allowed in allowed_paths:
      _landlock_allow(ruleset, path, allowed)
    prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
    check(libc().syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
  finally:
    os.close(ruleset)


def _landlock_allow(ruleset: int, path: str, allowed: int):
  fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
  try:
    rule = LandlockPathBeneathAttr(allowed_access=allowed, parent_fd=fd)
    check(libc().syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH,
                           ctypes.byref(rule), 0), f"landlock_add_rule({path})")
  finally:
    os.close(fd)


def apply_seccomp():
  """Allows every syscall but SECCOMP_DENIED (EPERM), namespace flags on clone (EPERM), clone3
  (ENOSYS, so libc falls back to clone, whose flags a filter can see) and socket() for any
  family but AF_INET/AF_INET6 (EACCES).  Other architectures' syscalls kill (libseccomp's
  default), so the filter cannot be bypassed through the 32-bit ABI."""
  lib = libseccomp()
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
      array = (ScmpArgCmp * max(len(comparisons), 1))(*comparisons)
      result = lib.seccomp_rule_add_array(ctx, action, number, len(comparisons), array)
      if result < 0:
        raise OSError(-result, f"seccomp_rule_add({name}): {os.strerror(-result)}")
    for name in SECCOMP_DENIED:
      deny(name, scmp_act_errno(errno.EPERM))
    deny("clone3", scmp_act_errno(errno.ENOSYS))
    for flag in (CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID,
                 CLONE_NEWNET, CLONE_NEWCGROUP):
      deny("clone", scmp_act_errno(errno.EPERM), ScmpArgCmp(0, SCMP_CMP_MASKED_EQ, flag, flag))
    # socket(family): allowed for 2 and 10 only; a value above 10 includes every value with
    # high bits set, which the kernel would truncate to an int.
    for family in (0, 1, 3, 4, 5, 6, 7, 8, 9):
      deny("socket", scmp_act_errno(errno.EACCES), ScmpArgCmp(0, SCMP_CMP_EQ, family, 0))
    deny("socket", scmp_act_errno(errno.EACCES), ScmpArgCmp(0, SCMP_CMP_GT, AF_INET6, 0))
    result = lib.seccomp_load(ctx)
    if result < 0:
      raise OSError(-result, f"seccomp_load: {os.strerror(-result)}")
  finally:
    lib.seccomp_release(ctx)
